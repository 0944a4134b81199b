"""APOGEE apVisit files read by the ``apogee-visit`` reader: one visit each, in the
observed frame on its own grid, resampled onto the apStar grid, normalised, grouped
by star for joint fits (or combined per star).

No real apVisit file ships with the package, so the files are written here in the
survey's layout (HDUs 1-4: flux, error, bitmask, wavelength (3, 4096), chip a (red)
first, wavelength decreasing along each chip; OBJID, MJD5, VHELIO, VRAD, BC in the
primary header) from an independent model: The Payne's real APOGEE network at known
labels, Doppler-shifted to a known barycentric rv per visit, evaluated by a cubic
spline at each visit's own observed wavelengths, times a smooth continuum, plus
Gaussian noise and a few flagged pixels.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits
from scipy.interpolate import CubicSpline

import payne_lite as pl
from payne_lite.catalog import (
    ApogeeVisitCatalog,
    apstar_wavelength,
    read_apvisit,
    resample_visit,
)
from payne_lite.constants import C_KMS

#: The injected star (inside the network's box) and its visits: barycentric rv,
#: barycentric correction [km/s], pixel offset of the visit's wavelength solution.
TRUTH = np.array([4850.0, 4.55, -0.12, 0.08, 6.0])
VISITS = ((12.3, -15.2, 0.0), (45.6, 8.7, 0.31), (-20.1, 25.0, -0.47))
#: The chips as in apVisit files: a (red), b (green), c (blue), each from its long
#: to its short wavelength end [A].
CHIPS = ((16960.0, 16472.0), (16436.0, 15860.0), (15806.0, 15142.0))
N_PIX = 4096
SNR = 80.0
CR_PIXELS = np.arange(1500, 1520)  # chip b: flagged cosmic rays (CRPIX, bit 1)
SKY_PIXELS = np.arange(2500, 2510)  # chip b: SIG_SKYLINE (bit 12), a warning


def _factor(v):
    return np.exp(np.arctanh(v / C_KMS))


def _rest_model(emu, labels):
    """A cubic spline of the network's spectrum per contiguous run of its grid:
    ``model(lambda_rest)``, 1 off the network's chips."""
    w = np.asarray(emu.wavelength, np.float64)
    f = np.asarray(emu.predict(np.asarray(labels)), np.float64)
    cuts = np.flatnonzero(np.diff(np.log(w)) > 3 * np.median(np.diff(np.log(w)))) + 1
    parts = [
        (w[a], w[b - 1], CubicSpline(w[a:b], f[a:b]))
        for a, b in zip([0, *cuts], [*cuts, w.size], strict=True)
    ]

    def model(x):
        out = np.ones_like(x)
        for lo, hi, s in parts:
            sel = (x >= lo) & (x <= hi)
            out[sel] = s(x[sel])
        return out

    return model


def _observed_grid(offset):
    """(3, 4096) decreasing wavelengths per chip, quadratic in pixel, moved by
    ``offset`` pixels (each visit's own solution)."""
    p = np.arange(N_PIX) + offset
    rows = []
    for hi, lo in CHIPS:
        d = (lo - hi) / (N_PIX - 1)
        rows.append(hi + d * p + 2e-7 * d * p * (p - N_PIX))
    return np.array(rows)


def write_apvisit(path, emu, *, star="2M00000000+0000000", mjd=57000, vhelio=0.0,
                  bc=0.0, offset=0.0, seed=0, labels=TRUTH, header=True):  # fmt: skip
    """An apVisit-layout file of the network's star at barycentric rv ``vhelio``."""
    rng = np.random.default_rng(seed)
    wave = _observed_grid(offset)
    model = _rest_model(emu, labels)
    # observed = rest * D(vrad), vrad = vhelio (-) bc: at vhelio in the barycentric
    # frame, lambda_bary = lambda_obs * D(bc)
    norm = model(wave * _factor(bc) / _factor(vhelio))
    x = (wave - 16000.0) / 1000.0
    cont = 200.0 * (1.0 + 0.3 * x - 0.2 * x**2) * (1.0 + 0.05 * np.arange(3))[:, None]
    err = cont / SNR
    flux = norm * cont + err * rng.standard_normal(wave.shape)
    bits = np.zeros(wave.shape, np.int16)
    bits[1, CR_PIXELS] |= 1 << 1
    flux[1, CR_PIXELS] += 50.0 * err[1, CR_PIXELS]  # what a cosmic ray leaves
    bits[1, SKY_PIXELS] |= 1 << 12
    hdr = fits.Header()
    if header:
        hdr["OBJID"] = star
        hdr["MJD5"] = mjd
        hdr["VHELIO"] = vhelio + 0.2  # the pipeline's estimate
        hdr["BC"] = bc
        hdr["VRAD"] = hdr["VHELIO"] - bc
    fits.HDUList(
        [
            fits.PrimaryHDU(header=hdr),
            fits.ImageHDU(flux.astype(np.float32), name="FLUX"),
            fits.ImageHDU(err.astype(np.float32), name="ERROR"),
            fits.ImageHDU(bits, name="MASK"),
            fits.ImageHDU(wave, name="WAVELENGTH"),
            fits.ImageHDU(np.zeros((3, 8)), name="SKY"),
        ]
    ).writeto(path)
    return path


@pytest.fixture(scope="module")
def visits(tmp_path_factory, payne_apogee):
    """Three visits of one star, one of another (at other labels)."""
    emu, _ = payne_apogee
    d = tmp_path_factory.mktemp("apvisit")
    paths = [
        write_apvisit(
            d / f"apVisit-dr17-9000-{57000 + i}-{100 + i:03d}.fits",
            emu,
            star="2M11111111+1111111",
            mjd=57000 + i,
            vhelio=v,
            bc=bc,
            offset=o,
            seed=i,
        )  # fmt: skip
        for i, (v, bc, o) in enumerate(VISITS)
    ]
    other = write_apvisit(
        d / "apVisit-dr17-9001-57100-007.fits", emu, star="2M22222222+2222222",
        mjd=57100, vhelio=-70.0, bc=3.0, offset=0.2, seed=9,
        labels=[5600.0, 4.3, 0.1, 0.0, 8.0],
    )  # fmt: skip
    return paths, other


def test_the_file_reads_back_as_stored(visits):
    path = visits[0][1]
    v = read_apvisit(path)
    with fits.open(path) as h:
        np.testing.assert_array_equal(v.flux, h[1].data)
        np.testing.assert_array_equal(v.flux_err, h[2].data)
        np.testing.assert_array_equal(v.bits, h[3].data)
        np.testing.assert_array_equal(v.wavelength, h[4].data)
        hdr = h[0].header
    assert v.flux.dtype.isnative and v.wavelength.dtype == np.float64
    assert (v.star, v.mjd) == ("2M11111111+1111111", 57001)
    assert (v.vhelio, v.bc, v.vrad) == (hdr["VHELIO"], hdr["BC"], hdr["VRAD"])
    assert v.id == path.name[: -len(".fits")]


def test_resampling_is_exact_for_quadratics_and_masks_what_bad_pixels_touch():
    """Keys' cubic convolution reproduces a quadratic of the pixel index; errors are
    sqrt(sum w^2 sigma^2) (sigma at a pixel, 0.8 sigma half-way for Catmull-Rom);
    an output pixel with a bad pixel among its weighted inputs is masked, as are
    the pixels beyond the chips."""
    n = 200
    wave = (16000.0 - 0.2 * np.arange(n))[None, :]  # decreasing, linear in index
    x = np.arange(n, dtype=np.float64)[::-1]  # each pixel's increasing-wavelength index
    flux = (3.0 + 0.01 * x - 1e-4 * x**2)[None, :]
    err = np.full((1, n), 0.5)
    bad = np.zeros((1, n), bool)
    bad[0, 100] = True
    grid = 15958.0 + 0.0731 * np.arange(700)
    f, e, m = resample_visit(wave, flux, err, bad, grid)
    wl = wave[0, ::-1]
    xi = np.interp(grid, wl, np.arange(n))
    inside = (grid >= wl[1]) & (grid <= wl[-2])
    assert np.all(m[~inside])
    bad_x = n - 1 - 100  # the bad pixel's index in increasing wavelength
    touch = inside & (np.abs(xi - bad_x) < 2) & (xi != np.round(xi))
    np.testing.assert_array_equal(m[inside], touch[inside] | (xi[inside] == bad_x))
    ok = inside & ~m
    np.testing.assert_allclose(f[ok], 3.0 + 0.01 * xi[ok] - 1e-4 * xi[ok] ** 2, 1e-12)
    t = xi[ok] - np.floor(xi[ok])
    w = 0.5 * np.stack(
        [
            -(t**3) + 2 * t**2 - t,
            3 * t**3 - 5 * t**2 + 2,
            -3 * t**3 + 4 * t**2 + t,
            t**3 - t**2,
        ]  # fmt: skip
    )
    np.testing.assert_allclose(e[ok], 0.5 * np.sqrt(np.sum(w**2, axis=0)), 1e-12)
    assert np.all(np.isinf(e[m])) and np.all(f[m] == 0)


def test_visits_are_one_group_per_star_on_the_apstar_grid(visits):
    paths, other = visits
    cat = pl.open_catalog([*paths, other])
    assert isinstance(cat, ApogeeVisitCatalog) and cat.name == "apogee-visit"
    assert len(cat) == 4 and cat.has_group and cat.has_mask
    np.testing.assert_array_equal(cat.wavelength, apstar_wavelength())
    assert cat.read_group().tolist() == ["2M11111111+1111111"] * 3 + [
        "2M22222222+2222222"
    ]
    chunk = cat.read(0, 4)
    assert chunk.ids.tolist() == [p.name[:-5] for p in [*paths, other]]
    assert chunk.group.tolist() == cat.read_group().tolist()
    good = ~chunk.mask
    assert np.all(np.isfinite(chunk.flux)) and np.all(chunk.flux_err[good] > 0)
    med = [np.median(chunk.flux[i][good[i]]) for i in range(4)]
    assert np.all(np.abs(np.array(med) - 0.97) < 0.04), med  # normalised
    # the cosmic rays (bad bit 1) are masked where they reach, the sky-line warning
    # (bit 12) is kept
    v = read_apvisit(paths[0])
    wl = v.wavelength[1] * np.exp(np.arctanh(VISITS[0][1] / C_KMS))

    def near(px):  # the grid pixels within 2 input pixels of ``px``
        return (cat.wavelength >= wl[px.max() + 2]) & (
            cat.wavelength <= wl[px.min() - 2]
        )

    assert np.all(chunk.mask[0][near(CR_PIXELS)])
    assert not np.any(chunk.mask[0][near(SKY_PIXELS)])
    prov = cat.provenance()
    assert prov["continuum"]["method"] == "continuum-pixels"
    assert prov["continuum"]["pixels_moved_by"] == "each visit's VHELIO"
    assert prov["apvisit"]["frame"] == "barycentric"
    assert "correlated" in prov["apvisit"]["noise"]


def test_combined_rows_average_each_stars_visits_at_rest(visits, payne_apogee):
    """``visits=False``: one row per star, its visits at rest, normalised and
    averaged with inverse-variance weights: about sqrt(3) less noise than one visit,
    and the network's rest-frame spectrum within its errors (measured: residuals
    of median -0.07 sigma, spread 1.00)."""
    emu, _ = payne_apogee
    paths, other = visits
    cat = pl.open_catalog([*paths, other], visits=False)
    assert len(cat) == 2 and not cat.has_group
    chunk = cat.read(0, 2)
    assert chunk.ids.tolist() == ["2M11111111+1111111", "2M22222222+2222222"]
    one = pl.open_catalog(paths[:1], visits=False).read(0, 1)
    g = ~chunk.mask[0] & ~one.mask[0]
    ratio = np.median(one.flux_err[0][g] / chunk.flux_err[0][g])
    assert 1.6 < ratio < 1.85, ratio
    w = np.asarray(emu.wavelength)
    on = np.isin(np.round(np.log10(cat.wavelength), 9), np.round(np.log10(w), 9))
    model = np.asarray(emu.predict(TRUTH))
    resid = (chunk.flux[0][on] - model) / chunk.flux_err[0][on]
    good = ~chunk.mask[0][on]
    assert abs(np.median(resid[good])) < 0.5 and 0.7 < np.std(resid[good]) < 1.3


def test_joint_fit_recovers_each_visits_rv_and_the_labels(
    visits, payne_apogee, tmp_path
):
    """``fit_catalog([apVisit files], group=True)``: one row per star; the three
    visits' barycentric rvs within 4 sigma of the injected ones (the header's
    VHELIO is off by 0.2 km/s, the fit is not), the labels near the truth; the
    other star's one visit is its own row."""
    emu, _ = payne_apogee
    paths, other = visits
    t = pl.fit_catalog(
        [*paths, other], tmp_path / "stars.fits", emu, group=True, progress=False
    )
    assert len(t) == 2 and list(t["n_visits"]) == [3, 1]
    assert t["id"][0].tolist() == [p.name[:-5] for p in paths]
    rv = np.asarray(t["rv"][0])
    rv_err = np.asarray(t["rv_err"][0])
    true_rv = np.array([v for v, _, _ in VISITS])
    assert np.all(np.abs(rv - true_rv) < 4 * rv_err + 0.02), (rv, rv_err)
    assert np.all(rv_err < 0.3)
    assert abs(t["rv"][1][0] - (-70.0)) < 1.0
    # measured: Teff, logg, [Fe/H], [alpha/Fe] within 2 sigma, vmacro 3.6 sigma
    floor = (30.0, 0.03, 0.02, 0.02, 1.0)
    for j, k in enumerate(emu.label_names):
        assert abs(t[k][0] - TRUTH[j]) < max(5 * t[f"{k}_err"][0], floor[j]), k
    assert t.meta["apvisit"]["frame"] == "barycentric"
    assert t.meta["continuum"]["method"] == "continuum-pixels"


def test_cli_group_fits_apvisit_files(visits, payne_apogee, tmp_path, capsys):
    from payne_lite.cli import main

    emu, _ = payne_apogee
    emu.save(tmp_path / "emu.h5")
    paths, _ = visits
    out = tmp_path / "star.fits"
    argv = [*paths, "--emulator", tmp_path / "emu.h5", "-o", out, "--group"]
    code = main([str(a) for a in ["fit", *argv, "--no-progress"]])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert stdout.splitlines()[0].startswith(
        "fitted 3 spectra (1 star, joint visits) x 8575 pixels from 3 apVisit files"
    )
    assert list(pl.read_results(out)["n_visits"]) == [3]


def test_bad_files_are_refused(visits, payne_apogee, tmp_path):
    emu, _ = payne_apogee
    paths, _ = visits
    cut = tmp_path / "apVisit-dr17-9000-57000-100.fits"
    cut.write_bytes(paths[0].read_bytes()[:100_000])
    with pytest.raises(pl.FileFormatError, match="truncated|corrupt"):
        pl.open_catalog([cut])
    with fits.open(paths[0]) as h:
        hdus = [h[0].copy(), *(x.copy() for x in h[1:4])]
        hdus.append(fits.ImageHDU(np.asarray(h[4].data)[:, :100]))
        fits.HDUList(hdus).writeto(tmp_path / "apVisit-short.fits")
    with pytest.raises(pl.FileFormatError, match=r"HDU 4 \(wavelength\).*does not"):
        pl.open_catalog([tmp_path / "apVisit-short.fits"])
    anon = write_apvisit(tmp_path / "apVisit-anon.fits", emu, header=False)
    with pytest.raises(pl.FileFormatError, match="without the star"):
        pl.open_catalog([anon])
    with pytest.raises(pl.FileFormatError, match="not an apVisit file"):
        pl.open_catalog([paths[0], pl.datasets.apogee_raw().apstar[0]])
    with pytest.raises(ValueError, match="frame must be"):
        pl.open_catalog(paths, frame="heliocentric")


def test_a_resumed_run_must_read_the_visits_the_same_way(visits, payne_apogee):
    """The resume identity holds the reader, its options (frame, visits, continuum,
    bad bits) and the files."""
    from payne_lite.catalog._parts import run_identity

    emu, _ = payne_apogee
    paths, _ = visits

    def ident(**kw):
        with pl.open_catalog(paths, **kw) as cat:
            return run_identity(
                cat, emu, mdn=None, method="lm", chunk_size=512, mask=None, p0=None,
                fit_kwargs={},
            )["input"]  # fmt: skip

    auto = ident()
    assert auto["reader"] == "apogee-visit"
    assert auto["reader_options"]["frame"] == "barycentric"
    assert ident(frame="observed") != auto
    assert ident(visits=False) != auto
    assert ident(continuum="sigma-clipped") != auto
    assert ident() == auto
    with pl.open_catalog(paths, frame="observed") as cat:
        prov = cat.provenance()
    assert prov["apvisit"]["frame"] == "observed"
    assert prov["continuum"]["pixels_moved_by"] == "each visit's VRAD"


def test_an_apvisit_file_is_recognised_by_its_layout_too(visits, tmp_path):
    """Renamed, an apVisit file is still claimed by its HDUs (2-D flux without
    wavelength keywords, a wavelength image of its shape in HDU 4); apStar files
    are not."""
    paths, _ = visits
    renamed = tmp_path / "visit-one.fits"
    renamed.write_bytes(paths[0].read_bytes())
    with pl.open_catalog([renamed]) as cat:
        assert cat.name == "apogee-visit" and cat.read(0, 1).ids.tolist() == [
            "visit-one"
        ]
    with pl.open_catalog(pl.datasets.apogee_raw().apstar[0]) as cat:
        assert cat.name == "apogee-fits"
