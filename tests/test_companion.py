"""The companion search of fit residuals (double-lined binaries) and QA bit 10."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table
from conftest import lanczos_shift

import payne_lite as pl
from payne_lite.constants import C_KMS
from payne_lite.fitting import FLAG_COMPANION, FLAG_POOR_FIT
from payne_lite.fitting._companion import chip_segments


def _two_chip_grid(n1=400, n2=300, step=1e-5):
    lw = np.r_[np.arange(n1), np.arange(n2) + n1 + 50] * step + np.log(15200.0)
    return np.exp(lw)


def _lines(p, centres, depth=0.4, sigma=1.5):
    x = np.arange(p)
    return 1.0 - sum(depth * np.exp(-0.5 * ((x - c) / sigma) ** 2) for c in centres)


def test_an_exact_shifted_copy_is_found_by_hand():
    """Residuals that are exactly -q times the model's line depths shifted by k
    pixels, plus a constant per chip: the search returns depth q, dv = k pixels'
    velocity, and nsigma = q sqrt(den), den worked by direct sums over the overlap."""
    wave = _two_chip_grid()
    segments, v_pix = chip_segments(wave)
    assert segments == [(0, 400), (400, 700)]
    assert v_pix == pytest.approx(C_KMS * 1e-5)  # one step of ln(lambda)
    rng = np.random.default_rng(1)
    model = _lines(700, rng.uniform(20, 680, 40))
    depth, q, k = 1.0 - model, 0.2, 9  # 9 pixels: 27 km/s
    shifted = np.zeros(700)
    for a, b in segments:  # the template shifted within each chip, zero outside
        shifted[a + k : b] = depth[a : b - k]
    flux = model - q * shifted + np.where(np.arange(700) < 400, 0.01, -0.02)
    err = np.full(700, 0.01)
    t = Table({"model_flux": model[None], "flags": np.zeros(1, np.int32)})
    c = pl.companion_search(flux[None], err[None], t, wave)
    assert c.depth[0] == pytest.approx(q, rel=1e-9)
    assert c.dv[0] == pytest.approx(k * v_pix)
    w = 1.0 / err**2
    den = 0.0
    for a, b in segments:  # the template's weighted variance over the overlap
        y, ws = depth[a : b - k], w[a + k : b]
        den += np.sum(ws * y * y) - np.sum(ws * y) ** 2 / np.sum(ws)
    assert c.nsigma[0] == pytest.approx(q * np.sqrt(den), rel=1e-9)
    # the same copy on the blue side; and masked pixels take no part
    flux2 = model.copy()
    for a, b in segments:
        flux2[a : b - k] -= q * depth[a + k : b]
    mask = np.zeros(700, bool)
    mask[100:130] = True
    flux2[100:130] = np.nan
    c2 = pl.companion_search(flux2[None], err[None], t, wave, mask=mask)
    assert c2.dv[0] == pytest.approx(-k * v_pix) and c2.depth[0] == pytest.approx(q)
    # add_to: columns and bit 10; a second search replaces the first
    t["flags"] = np.array([FLAG_POOR_FIT], np.int32)
    c.add_to(t)
    assert t["flags"][0] == FLAG_POOR_FIT | FLAG_COMPANION
    assert t["flags"].dtype == np.int32  # the schema's
    assert t["companion_dv"].unit == "km / s" and t["companion_depth"][0] == c.depth[0]
    c.add_to(t, depth=0.5)
    assert (
        t["flags"][0] == FLAG_POOR_FIT
        and "second set of lines" in (pl.fitting.FLAG_BITS[10])
    )


def test_refusals():
    wave = _two_chip_grid()
    model = _lines(700, [100, 500])
    t = Table({"model_flux": model[None], "flags": np.zeros(1, np.int32)})
    flux, err = model[None], np.full((1, 700), 0.01)
    with pytest.raises(ValueError, match="return_model=True"):
        pl.companion_search(flux, err, Table({"flags": [0]}), wave)
    with pytest.raises(ValueError, match="one shape"):
        pl.companion_search(flux[:, :-1], err[:, :-1], t, wave[:-1])
    with pytest.raises(ValueError, match="wavelength"):
        pl.companion_search(flux, err, t, wave[:-1])
    linear = np.linspace(15200.0, 16900.0, 700)  # 11 % change of step
    with pytest.raises(ValueError, match="log-uniform"):
        pl.companion_search(flux, err, t, linear)
    with pytest.raises(ValueError, match="dv_range"):
        pl.companion_search(flux, err, t, wave, dv_range=(10.0, 5.0))
    with pytest.raises(ValueError, match="rows"):
        pl.companion_search(flux, err, t, wave).add_to(Table({"flags": [0, 0]}))
    # a failed fit (bit 2) and a spectrum without usable pixels give NaN
    t2 = Table({"model_flux": np.vstack([model, model]), "flags": np.array([4, 0])})
    err2 = np.vstack([err, np.zeros_like(err)])
    c = pl.companion_search(np.vstack([flux, flux]), err2, t2, wave)
    assert np.all(np.isnan(c.depth)) and not np.any(c.flagged())


def test_real_binary_flagged_single_star_and_noise_not(payne_apogee, payne_data):
    """The real network's fits (rv free, its mask): the real double-lined binary's
    two visits with separated lines are flagged with companion lines 0.3+ as deep
    at |dv| > 50 km/s; the real single dwarf is not (0.04 here: a line-shape
    misfit); noise-only mocks at S/N 100 give under 0.02 and no flag; twins
    injected at light ratio 0.3, 40-150 km/s away, are flagged at their dv
    within 2 pixels."""
    emu, mask = payne_apogee
    wave = np.asarray(emu.wavelength, np.float64)
    single, visits = payne_data.combined_spectrum(), payne_data.visits()
    rng = np.random.default_rng(3)
    n = 16
    lo, hi = emu.bounds
    clean = np.asarray(
        emu.predict(lo + (hi - lo) * rng.uniform(0.1, 0.9, (n, lo.size))), np.float64
    )
    u = rng.choice([-1, 1], n) * rng.uniform(40.0, 150.0, n) / chip_segments(wave)[1]
    twins = np.stack(
        [(f + 0.3 * lanczos_shift(f, s)) / 1.3 for f, s in zip(clean, u, strict=True)]
    )
    mocks = np.vstack([clean, twins])
    mocks = np.where(np.isfinite(mocks), mocks, 1.0) + 0.01 * rng.standard_normal(
        mocks.shape
    )
    flux = np.vstack([single.flux[None], visits.flux, mocks])
    err = np.vstack([single.flux_err[None], visits.flux_err, np.full_like(mocks, 0.01)])
    t = pl.fit(flux, err, emu, mask=mask, return_model=True)
    c = pl.companion_search(flux, err, t, wave, mask=mask)
    c.add_to(t)
    bit = (np.asarray(t["flags"]) & FLAG_COMPANION) != 0
    assert not bit[0] and 0.0 < c.depth[0] < 0.05, c.depth[0]
    assert np.all(bit[1:3]) and np.all(c.depth[1:3] > 0.3), c.depth[1:4]
    assert np.all(np.abs(c.dv[1:3]) > 50) and np.all(c.nsigma[1:3] > 50)
    noise, inj = slice(4, 4 + n), slice(4 + n, None)
    assert not np.any(bit[noise]) and np.all(c.depth[noise] < 0.02), c.depth[noise]
    assert np.all(bit[inj]) and np.all(c.depth[inj] > 0.15), c.depth[inj]
    v_pix = chip_segments(wave)[1]
    np.testing.assert_allclose(c.dv[inj], u * v_pix, atol=2 * v_pix)


def test_joint_fits_of_the_real_binarys_visits(payne_apogee, payne_data):
    """A joint fit of the binary's three visits (group=) and of the single star:
    the search runs visit by visit against the joint model, (n_star, V) columns
    that pad_visits carries; the binary is flagged (its two separated visits), the
    single star is not; the per-visit values are those of the visits' own
    single-spectrum models searched alone."""
    emu, mask = payne_apogee
    wave = np.asarray(emu.wavelength, np.float64)
    single, visits = payne_data.combined_spectrum(), payne_data.visits()
    flux = np.vstack([visits.flux, single.flux[None]])
    err = np.vstack([visits.flux_err, single.flux_err[None]])
    t = pl.fit(flux, err, emu, mask=mask, group=[5, 5, 5, 9], return_model=True)
    c = pl.companion_search(flux, err, t, wave, mask=mask)
    assert c.depth.shape == (2, 3) and np.all(np.isnan(c.depth[1, 1:]))
    assert np.all(c.depth[0, :2] > 0.3) and c.depth[1, 0] < 0.05, c.depth
    c.add_to(t)
    assert list((np.asarray(t["flags"]) & FLAG_COMPANION) != 0) == [True, False]
    padded = pl.fitting.pad_visits(t, 4)
    assert padded["companion_depth"].shape == (2, 4)
    assert np.isnan(padded["companion_depth"][0, 3])
    # each visit against its own model: the same search as a point table's row
    point = Table({"model_flux": np.asarray(t["model_flux"][0]), "flags": [0, 0, 0]})
    alone = pl.companion_search(flux[:3], err[:3], point, wave, mask=mask)
    np.testing.assert_allclose(alone.depth, c.depth[0], rtol=1e-12)
    np.testing.assert_allclose(alone.dv, c.dv[0], rtol=1e-12)


def test_check_catalog_chunk_by_chunk_equals_the_fits_in_memory(
    payne_apogee, tmp_path, capsys
):
    """A catalog of 60 mocks of the real network (S/N 100, rv free) with the same
    two lines missing from the model of every star and a twin companion in three:
    ``payne-lite check`` rebuilds the models from the results file a chunk at a
    time (chunks of 25) and finds what pl.fit(return_model=True) plus
    pl.companion_search and pl.pixel_residuals find in memory: the same companion
    columns, bit 1024 on exactly the twins (at their dv within two pixels), and
    the same proposed mask, holding the lines' cores; the mask file it writes is
    the old mask joined."""
    from payne_lite.cli import main
    from payne_lite.fitting import PixelResiduals

    emu, mask = payne_apogee
    wave = np.asarray(emu.wavelength, np.float64)
    rng = np.random.default_rng(12)
    n = 60
    lo, hi = emu.bounds
    clean = np.asarray(
        emu.predict(lo + (hi - lo) * rng.uniform(0.25, 0.75, (n, lo.size))), np.float64
    )
    twins = np.array([4, 17, 40])
    v_pix = chip_segments(wave)[1]
    u = np.array([-20.0, 15.0, 25.0])  # pixels: -83, +62, +104 km/s
    for i, s in zip(twins, u, strict=True):
        clean[i] = (
            clean[i] + 0.3 * np.nan_to_num(lanczos_shift(clean[i], s), nan=1.0)
        ) / 1.3
    x = np.arange(clean.shape[1])
    centres = rng.choice(np.flatnonzero(~mask[50:-50]) + 50, 2, replace=False)
    lines = np.ones(clean.shape[1])
    for c in centres:
        lines *= 1 - 0.08 * np.exp(-0.5 * ((x - c) / 1.5) ** 2)
    err = np.full_like(clean, 0.01)
    flux = clean * lines + err * rng.standard_normal(clean.shape)
    ids = np.array([f"star{i:02d}" for i in range(n)])
    t = pl.fit(flux, err, emu, mask=mask, return_model=True)
    t["id"] = ids
    cat = pl.write_catalog(tmp_path / "cat.h5", flux, err, wave, ids=ids)
    emu_path = emu.save(tmp_path / "emu.h5") or tmp_path / "emu.h5"
    res = tmp_path / "res.fits"
    pl.write_results(t[[c for c in t.colnames if c != "model_flux"]], res)
    np.save(tmp_path / "mask.npy", mask)
    args = ["check", str(res), str(cat), "--emulator", str(emu_path), "-o",
            str(tmp_path / "checked.fits"), "--mask", str(tmp_path / "mask.npy"),
            "--mask-out", str(tmp_path / "proposed.npy"), "--chunk-size", "25"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "second set of lines (bit 1024): 3 of 60 searched" in text, text
    assert "row 17 (star17): depth" in text, text
    got = pl.read_results(tmp_path / "checked.fits")
    bit = (np.asarray(got["flags"]) & FLAG_COMPANION) != 0
    assert list(np.flatnonzero(bit)) == list(twins)
    np.testing.assert_allclose(got["companion_dv"][twins], u * v_pix, atol=2 * v_pix)
    # the same checks in memory, from the fit's own models: NaN exactly where the
    # rebuilt model is undefined (the ~33 pixels whose shift leaves the grid)
    _, valid = pl.catalog.model_from_results(t, emu, wave)
    assert 0 < np.sum(~valid[0]) < 50
    np.testing.assert_array_equal(np.isnan(np.asarray(t["model_flux"])), ~valid)
    mem = pl.companion_search(flux, err, t, wave, mask=mask)
    np.testing.assert_allclose(got["companion_depth"], mem.depth, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["companion_dv"], mem.dv)
    stats = pl.pixel_residuals(flux, err, t, mask=mask)
    proposed = np.load(tmp_path / "proposed.npy")
    np.testing.assert_array_equal(proposed, stats.propose_mask() | mask)
    for c in centres:
        assert proposed[c - 1 : c + 2].all()
    # PixelResiduals.merge of chunks is the statistics of the whole
    halves = [pl.pixel_residuals(flux[s], err[s], t[s], mask=mask)
              for s in (slice(0, 25), slice(25, None))]  # fmt: skip
    merged = PixelResiduals.merge(halves)
    np.testing.assert_array_equal(merged.n, stats.n)
    np.testing.assert_allclose(merged.mean, stats.mean, atol=1e-12)
    np.testing.assert_allclose(merged.rms, stats.rms, atol=1e-12)
    # refusals: a mask file that is not (P,) bool, another catalog's length, a
    # joint fit's table of other rows
    np.save(tmp_path / "bad.npy", mask.astype(float))
    bad = [*args[:8], str(tmp_path / "bad.npy")]
    assert main(bad) != 0
    assert "--mask: expected a (P,) bool array, got float64" in capsys.readouterr().err
    with pytest.raises(ValueError, match="holds 60 spectra and the results 59"):
        pl.check_catalog(t[:59], cat, emu)
    with pytest.raises(ValueError, match="holds 60 spectra and the results 2 visits"):
        pl.check_catalog(Table({"visit_rows": [[0, 1]]}), cat, emu)


def test_check_catalog_of_joint_fits_checks_each_visit(payne_apogee, tmp_path, capsys):
    """A catalog of visits (8 stars of the real network, 2-3 visits each at S/N 100,
    rows of the stars interleaved), fitted jointly (``fit_catalog(group=True)``);
    one star is a twin binary whose companion sits at -83 and +62 km/s in its
    first two visits. ``check_catalog`` (and ``payne-lite check``) rebuilds each
    visit's model from the star's row (:func:`payne_lite.fitting.per_visit`) and
    finds what pl.companion_search finds on the joint fit's own models in memory:
    (n_star, V) columns equal to 1e-4, bit 1024 on the binary alone."""
    from payne_lite.cli import main
    from payne_lite.fitting import per_visit

    emu, _ = payne_apogee
    wave = np.asarray(emu.wavelength, np.float64)
    rng = np.random.default_rng(21)
    n_vis = np.array([3, 2, 3, 2, 3, 2, 2, 3])
    star = np.repeat(np.arange(n_vis.size), n_vis)
    star = star[rng.permutation(star.size)]  # a star's visits anywhere in the file
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.25, 0.75, (n_vis.size, lo.size))
    rest = np.asarray(emu.predict(labels), np.float64)
    pix = C_KMS * np.median(np.diff(np.log(wave)))  # km/s a pixel
    flux = np.empty((star.size, wave.size))
    binary, comp_u = 5, iter([-20.0, 15.0])
    seen = {}
    for r, s in enumerate(star):
        v = seen.get(s, 0)
        seen[s] = v + 1
        spec = np.nan_to_num(
            lanczos_shift(rest[s], rng.uniform(-30, 30) / pix), nan=1.0
        )
        if s == binary and v < 2:
            u = next(comp_u)
            spec = (spec + 0.4 * np.nan_to_num(lanczos_shift(spec, u), nan=1.0)) / 1.4
        flux[r] = spec
    err = np.full_like(flux, 0.01)
    flux += err * rng.standard_normal(flux.shape)
    names = np.array([f"s{s}" for s in star])
    ids = np.array([f"visit{r:02d}" for r in range(star.size)])
    cat = pl.write_catalog(tmp_path / "v.h5", flux, err, wave, ids=ids, group=names)
    res = tmp_path / "stars.fits"
    pl.fit_catalog(cat, res, emu, group=True)
    t = pl.read_results(res)
    got = pl.check_catalog(t, cat, emu, chunk_size=7)
    assert got.companion.depth.shape == np.shape(t["visit_rows"])
    hit = (np.asarray(got.table["flags"]) & FLAG_COMPANION) != 0
    assert list(np.asarray(got.table["group"], str)[hit]) == [f"s{binary}"]
    # in memory: the joint fit's own models, searched visit by visit
    mem_t = pl.fit(flux, err, emu, group=names, return_model=True)
    mem = pl.companion_search(flux, err, mem_t, wave)
    order = [list(np.asarray(mem_t["group"], str)).index(g) for g in t["group"]]
    np.testing.assert_array_equal(
        np.asarray(mem_t["visit_rows"])[order], t["visit_rows"]
    )
    np.testing.assert_allclose(
        got.companion.depth, mem.depth[order], rtol=1e-4, atol=1e-6, equal_nan=True
    )
    # per_visit: one row per visit, the star's labels and the visit's rv
    pv = per_visit(t)
    assert len(pv) == star.size and sorted(pv["row"]) == list(range(star.size))
    i = int(np.flatnonzero(np.asarray(pv["row"]) == 0)[0])
    assert pv["Teff"][i] == t["Teff"][pv["star"][i]]
    assert pv["rv"][i] == t["rv"][pv["star"][i], pv["visit"][i]]
    assert pv["id"][i] == "visit00"
    # the command line
    emu_path = tmp_path / "emu.h5"
    emu.save(emu_path)
    args = ["check", str(res), str(cat), "--emulator", str(emu_path), "-o",
            str(tmp_path / "checked.fits"), "--chunk-size", "7"]  # fmt: skip
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"{star.size} spectra of" in text and "joint fits of 8 stars" in text, text
    assert "second set of lines (bit 1024): 2 of 20 searched" in text, text
    assert f"(s{binary}) visit 1" in text and f"(s{binary}) visit 2" in text, text
