"""The two real DR13 stars as the survey delivers them (``data/apogee_raw``), read by
the ``apogee-fits`` reader: the continuum's treatment chosen by the kind of file,
pixel masks from APOGEE_PIXMASK, the visits of an apStar file as a joint-fit group.

References: the FITS files read directly with astropy (rows, bits), the normaliser
applied by hand, and the star's aspcapStar file (ASPCAP's reduction of the same
data) for the fits.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

import payne_lite as pl
from payne_lite.catalog import (
    APOGEE_BAD_PIXEL_BITS,
    APOGEE_PIXMASK_BITS,
    ApogeeFitsCatalog,
)
from payne_lite.fitting import FLAG_BITS
from payne_lite.observe import APOGEE_CHIPS

RAW = pl.datasets.apogee_raw()


def _hdu_rows(path, rows):
    with fits.open(path) as h:
        f, e, b = (np.asarray(h[k].data[rows], np.float64) for k in (1, 2, 3))
        w = 10 ** (
            h[1].header["CRVAL1"] + h[1].header["CDELT1"] * np.arange(f.shape[1])
        )
    return w, f, e, b.astype(np.int64)


def test_bad_bits_are_the_named_data_bits():
    names = [APOGEE_PIXMASK_BITS[b][0] for b in range(8)]
    assert names == [
        "BADPIX", "CRPIX", "SATPIX", "UNFIXABLE",
        "BADDARK", "BADFLAT", "BADERR", "NOSKY",
    ]  # fmt: skip
    assert APOGEE_BAD_PIXEL_BITS == sum(1 << b for b in range(8))
    assert all("warning" in APOGEE_PIXMASK_BITS[b][1] for b in range(8, 15))


def test_apstar_is_read_raw_for_a_fitted_continuum_aspcapstar_kept():
    """Default ``continuum="auto"``: an apStar row is its HDU row 0 as stored (bad
    bits masked), its continuum left to the fit (``fit_defaults``: a quadratic per
    APOGEE chip); an aspcapStar row is its HDU 1 as stored (bad pixels aside). The
    provenance says so, per kind of file."""
    cat = pl.open_catalog([RAW.apstar[0], RAW.aspcapstar[0]])
    assert isinstance(cat, ApogeeFitsCatalog) and cat.kinds == ["apStar", "aspcapStar"]
    chunk = cat.read(0, 2)
    w, f, e, bits = _hdu_rows(RAW.apstar[0], [0])
    mask = ((bits & APOGEE_BAD_PIXEL_BITS) != 0) | (e >= 1e9)  # 1e10: no data
    np.testing.assert_array_equal(chunk.mask[0], mask[0])
    good = ~mask[0]
    np.testing.assert_allclose(chunk.flux[0][good], f[0][good], rtol=1e-6)
    np.testing.assert_allclose(chunk.flux_err[0][good], e[0][good], rtol=1e-6)
    assert np.all(np.isinf(chunk.flux_err[0][~good]))  # no weight, no NaN
    assert cat.fit_defaults() == {"cont_deg": pl.ChipPolynomial.apogee(2)}
    with fits.open(RAW.aspcapstar[0]) as h:
        aspcap = np.asarray(h[1].data, np.float64)
    good = ~chunk.mask[1]
    np.testing.assert_allclose(chunk.flux[1][good], aspcap[good], rtol=1e-7)
    prov = cat.provenance()
    assert prov["continuum"]["method"] == "per-file-kind"
    assert prov["continuum"]["apStar"] == {
        "method": "fit", "deg": 2, "chips": [list(c) for c in APOGEE_CHIPS],
    }  # fmt: skip
    assert prov["continuum"]["aspcapStar"] == {"method": "none"}
    assert prov["apogee_rows"] == "combined: HDU row 0"


def test_apstar_normalised_through_the_cannon_pixels_on_request():
    """``continuum="continuum-pixels"``: an apStar row equals
    ContinuumPixels.apogee() applied by hand to HDU row 0 with its bad bits, and
    nothing is left to the fit."""
    cat = pl.open_catalog([RAW.apstar[0]], continuum="continuum-pixels")
    chunk = cat.read(0, 1)
    w, f, e, bits = _hdu_rows(RAW.apstar[0], [0])
    mask = ((bits & APOGEE_BAD_PIXEL_BITS) != 0) | (e >= 1e9)
    ref = pl.ContinuumPixels.apogee()(w, f, e, mask)
    np.testing.assert_array_equal(chunk.mask[0], ref.mask[0])
    np.testing.assert_allclose(chunk.flux[0], ref.flux[0], rtol=1e-6)
    np.testing.assert_allclose(chunk.flux_err[0], ref.flux_err[0], rtol=1e-6)
    assert 0.9 < np.median(chunk.flux[0][~chunk.mask[0]]) < 1.1
    assert cat.fit_defaults() == {}
    assert cat.provenance()["continuum"]["method"] == "continuum-pixels"


def test_visits_are_rows_2_and_up_grouped_by_file():
    cat = pl.open_catalog(list(RAW.apstar), visits=True, continuum="none")
    n_visits = [fits.getheader(p)["NVISITS"] for p in RAW.apstar]
    assert len(cat) == sum(n_visits) == 7 and cat.has_group
    chunk = cat.read(0, len(cat))
    ids = [
        f"{p.name[:-5]}[{r}]"
        for p, n in zip(RAW.apstar, n_visits, strict=True)
        for r in range(2, 2 + n)
    ]
    assert chunk.ids.tolist() == ids
    assert cat.read_group().tolist() == [i.split("[")[0] for i in ids]
    w, f, e, bits = _hdu_rows(RAW.apstar[1], [2, 3, 4, 5])
    good = ~chunk.mask[3:]
    np.testing.assert_array_equal(chunk.flux[3:][good], f[good].astype(np.float32))
    np.testing.assert_array_equal(
        chunk.mask[3:], ((bits & APOGEE_BAD_PIXEL_BITS) != 0) | ~(e > 0)
    )
    assert cat.provenance()["apogee_rows"].startswith("visits")


def test_continuum_pixels_off_the_grid_are_refused(tmp_path):
    """Continuum pixels that do not land on the files' grid: a clear error, not a
    spectrum masked through and through."""
    with fits.open(RAW.apstar[0]) as h:
        for k in (1, 2, 3):
            h[k].header["CRVAL1"] = 4.179 + 3e-6  # half a pixel off
        h.writeto(tmp_path / "apStar-shifted.fits")
    with pytest.raises(ValueError, match="continuum pixels.*sigma-clipped"):
        pl.open_catalog(tmp_path / "apStar-shifted.fits", continuum="continuum-pixels")
    with pytest.raises(ValueError, match="unknown continuum normalisation"):
        pl.open_catalog(RAW.apstar[0], continuum="spline")


@pytest.fixture(scope="module")
def fits_of_both(tmp_path_factory, payne_apogee):
    emu, _ = payne_apogee
    out = tmp_path_factory.mktemp("raw") / "both.fits"
    paths = [*RAW.apstar, *RAW.aspcapstar]
    return pl.fit_catalog(paths, out, emu, progress=False)


def test_fits_of_apstar_and_aspcapstar_agree_in_their_flags(fits_of_both):
    """Both stars are cool M dwarfs outside the network's box (DR13: 2700 K): from
    either file, the fit ends at a bound of the box with a poor fit (bits 1 and 7);
    nothing that would tell one file's fit from the other's. Without the
    normalisation the apStar fits sat at Teff = 6996 K, flagged just as well, so
    the labels are compared on mocks (benchmarks/bench_continuum.py)."""
    t = fits_of_both
    assert t.meta["continuum"]["apStar"]["method"] == "fit"
    assert pl.ChipPolynomial.from_meta(t.meta) == pl.ChipPolynomial.apogee(2)
    bits = (1 << 1) | (1 << 7)
    assert "bound" in FLAG_BITS[1] and "poor fit" in FLAG_BITS[7]
    flags = np.asarray(t["flags"])
    assert np.all(flags[:2] & bits == bits)
    np.testing.assert_array_equal(flags[:2] & bits, flags[2:] & bits)
    assert np.all(t["converged"])


def test_the_fitted_continuum_normalises_apstar_as_aspcap_does(fits_of_both):
    """The continuum fitted per chip (its coefficients in the results, the basis of
    ChipPolynomial on the files' grid) divides each apStar spectrum into ASPCAP's
    normalised flux to a few per cent on The Cannon's continuum pixels: per chip a
    median ratio of 1.03-1.07 (ASPCAP puts these cool M dwarfs' continuum a few per
    cent higher, as through the continuum pixels: tests/test_continuum.py) and a
    robust spread under 2 % (measured 0.15-1.6 %)."""
    t = fits_of_both
    cont = pl.ChipPolynomial.from_meta(t.meta)
    with pl.open_catalog(list(RAW.apstar)) as cat:
        chunk, wave = cat.read(0, 2), cat.wavelength
    basis = cont.basis(wave)
    pixels = pl.ContinuumPixels.apogee().pixels(wave)
    for i, path in enumerate(RAW.aspcapstar):
        c = basis @ np.array([t[name][i] for name in cont.names])
        with fits.open(path) as h:
            aspcap = np.asarray(h[1].data, np.float64)
        for lo, hi in APOGEE_CHIPS:
            s = pixels & (wave >= lo) & (wave < hi) & ~chunk.mask[i] & (aspcap > 0)
            ratio = chunk.flux[i][s] / c[s] / aspcap[s]
            med = np.median(ratio)
            assert 1.0 < med < 1.1, (path.name, lo, med)
            assert 1.4826 * np.median(np.abs(ratio - med)) < 0.02, (path.name, lo)


def test_n_good_pixels_counts_the_pixels_left_by_the_bitmask(payne_apogee):
    """One apStar spectrum fitted twice in one call, with and without its bad-bit
    mask: n_good_pixels drops by the flagged pixels that the fit would otherwise
    use (inside the model's chips, with data: errors of 1e10 are masked either
    way)."""
    emu, _ = payne_apogee
    cat = pl.open_catalog(RAW.apstar[:1])
    s = cat.read(0, 1)
    none = pl.open_catalog(RAW.apstar[:1], bad_bits=0).read(0, 1)
    t = pl.fit(
        np.concatenate([s.flux, none.flux]),
        np.concatenate([s.flux_err, none.flux_err]),
        emu,
        mask=np.concatenate([s.mask, none.mask]),
        wavelength=cat.wavelength,
        **cat.fit_defaults(),  # the raw flux's continuum, fitted
    )
    n_masked, n_all = np.asarray(t["n_good_pixels"])
    extra = s.mask[0] & ~none.mask[0]  # flagged, with data (error below 1e10)
    w = pl.open_catalog(RAW.apstar[:1]).wavelength
    on_model = np.zeros(w.size, bool)
    for lo, hi in ((322, 3242), (3648, 6048), (6412, 8306)):  # ASPCAP's pixels
        on_model[lo:hi] = True
    # flagged pixels just outside ASPCAP's chips may be on the model too, at some
    # rv of the window (measured: 193 dropped, 184 of them inside ASPCAP's chips)
    expect = np.count_nonzero(extra & on_model)
    assert expect <= n_all - n_masked <= 1.1 * expect
    assert n_all - n_masked > 100


def test_cli_fits_the_visits_of_apstar_files_with_group(tmp_path, payne_apogee, capsys):
    """``payne-lite fit apStar-*.fits --group``: each file's visits fitted jointly,
    unnormalised, each visit's continuum fitted per chip; the table says which rows
    (ids ``<file>[<row>]``, ``meta["apogee_rows"]``) and which continuum."""
    from payne_lite.cli import main

    emu, _ = payne_apogee
    emu.save(tmp_path / "emu.h5")
    out = tmp_path / "stars.fits"
    argv = ["fit", *RAW.apstar, "--emulator", tmp_path / "emu.h5", "-o", out]
    code = main([str(a) for a in [*argv, "--group", "--no-progress"]])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.splitlines()[0] == (
        "fitted 7 spectra (2 stars, joint visits) x 8575 pixels from 2 FITS files "
        "(lm, cont_deg 2 per chip, apStar unnormalised)"
    )
    t = pl.read_results(out)
    assert list(t["n_visits"]) == [3, 4]
    assert t["id"][1].tolist() == [
        f"{RAW.apstar[1].name[:-5]}[{r}]" for r in range(2, 6)
    ]
    assert t["id"][0].tolist()[:3] == [
        f"{RAW.apstar[0].name[:-5]}[{r}]" for r in range(2, 5)
    ]
    assert t.meta["apogee_rows"].startswith("visits: HDU rows 2 and up")
    assert t.meta["continuum"]["method"] == "fit"
    assert t.meta["continuum"]["file_kinds"] == ["apStar"]
    assert t.meta["cont_chips"] == [list(c) for c in APOGEE_CHIPS]
    # the same from Python: group=True reads the files' visits (Reader.grouped),
    # no visits=True needed; a reader passed in is left open for its owner
    with pl.open_catalog(list(RAW.apstar)) as cat:
        assert not cat.has_group
        api = pl.fit_catalog(
            cat, tmp_path / "api.fits", emu, group=True, progress=False
        )
        assert len(cat) == 2 and not cat.has_group  # still the combined rows
    assert list(api["n_visits"]) == [3, 4]
    assert api["id"][1].tolist() == t["id"][1].tolist()
    assert api.meta["apogee_rows"] == t.meta["apogee_rows"]
    for name in (*emu.label_names, "chi2"):
        np.testing.assert_array_equal(api[name], t[name])


def test_a_resumed_run_must_read_the_files_the_same_way(payne_apogee):
    """The resume identity of an apogee-fits catalog holds its normalisation and
    rows: another continuum or visits=True is another run; aspcapStar files read
    as they are keep the identity earlier versions wrote (no new keys)."""
    from payne_lite.catalog._parts import run_identity

    emu, _ = payne_apogee

    def ident(paths, **kw):
        with pl.open_catalog(paths, **kw) as cat:
            return run_identity(
                cat, emu, mdn=None, method="lm", chunk_size=512, mask=None, p0=None,
                fit_kwargs={},
            )["input"]  # fmt: skip

    auto = ident(list(RAW.apstar))
    assert auto["continuum"]["method"] == "fit"
    assert ident(list(RAW.apstar), continuum="sigma-clipped") != auto
    assert ident(list(RAW.apstar), visits=True) != auto
    assert ident(list(RAW.apstar)) == auto
    plain = ident(list(RAW.aspcapstar))
    assert "continuum" not in plain and "visits" not in plain
