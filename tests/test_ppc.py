"""Posterior predictive checks of point fits: chi2_pvalue, max_dip, QA bit 9."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chi2 as chi2_dist
from scipy.stats import norm

import payne_lite as pl
from payne_lite.fitting import FLAG_LOCAL_MISFIT
from payne_lite.fitting._ppc import chi2_pvalue, dip_limit, max_dip


def test_statistics_by_hand():
    flux = np.zeros((1, 10))
    assert max_dip(flux, np.ones_like(flux), flux)[0] == 0.0
    assert max_dip(flux + 1, np.zeros_like(flux), flux)[0] == 0.0  # no weight
    # dip: residuals 0 except 2 sigma on 3 pixels (error 0.5 -> weight 4)
    r = np.zeros((1, 12))
    r[0, 4:7] = 1.0
    wd = np.full_like(r, 4.0)
    want = 3 * 2.0 / np.sqrt(5)  # the best 5-pixel window holds all three
    assert max_dip(r, wd, np.zeros_like(r))[0] == pytest.approx(want)
    assert max_dip(-r, wd, np.zeros_like(r))[0] == pytest.approx(want)
    assert dip_limit(6000) == pytest.approx(norm.isf(0.5e-3 / 6000))
    assert chi2_pvalue(100.0, 100) == pytest.approx(chi2_dist.sf(100.0, 100))
    assert np.isnan(chi2_pvalue(np.nan, 10)) and np.isnan(chi2_pvalue(5.0, 0))


def test_good_fits_pass_and_unmodelled_lines_are_flagged(payne_apogee):
    """Mocks of the real network at S/N 100 (rv fixed at 0): the chi2 p-values are
    uniform (as many below 0.5 as above, within noise) and bit 9 is rare; the same
    spectra with three unmodelled Gaussian lines each (15 % deep, sigma 2 pixels)
    are all flagged by bit 9."""
    emu, mask = payne_apogee
    rng = np.random.default_rng(3)
    n = 120
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, lo.size))
    clean = emu.predict(labels).astype(np.float64)
    err = np.full_like(clean, 0.01)
    flux = clean + err * rng.standard_normal(clean.shape)
    t = pl.fit(flux, err, emu, mask=mask, fixed={"rv": 0.0}, return_model=True)
    # the fit's max_dip (on the device, float32) is the NumPy statistic's
    w = np.where(mask, 0.0, 1.0 / err**2)
    want = max_dip(flux, w, np.asarray(t["model_flux"], np.float64))
    np.testing.assert_allclose(t["max_dip"], want, rtol=1e-3)
    p = np.asarray(t["chi2_pvalue"])
    assert 0.35 < np.mean(p < 0.5) < 0.65, np.mean(p < 0.5)
    assert np.mean(p < 0.05) < 0.12
    assert np.sum((t["flags"] & FLAG_LOCAL_MISFIT) != 0) <= 2
    x = np.arange(clean.shape[1])
    lines = flux.copy()
    good = np.flatnonzero(~mask[20:-20]) + 20
    for i in range(n):
        for c in rng.choice(good, 3, replace=False):
            lines[i] *= 1 - 0.15 * np.exp(-0.5 * ((x - c) / 2.0) ** 2)
    t2 = pl.fit(lines, err, emu, mask=mask, fixed={"rv": 0.0})
    assert np.all((t2["flags"] & FLAG_LOCAL_MISFIT) != 0)
    assert np.all(np.asarray(t2["chi2_pvalue"]) < 1e-6)


def test_the_fits_dip_is_that_of_the_returned_model(payne_apogee):
    """``max_dip`` comes from the LM's last residuals, kept with each lane's result
    through the rescue from other starts and the rv polish: with rv free, and a
    third of the spectra given unmodelled lines (chi2 too high: rescued from every
    start), it is the NumPy statistic of the returned model at the returned
    parameters, and the spectra with lines have the largest."""
    emu, mask = payne_apogee
    rng = np.random.default_rng(8)
    n = 36
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, lo.size))
    err = np.full((n, emu.n_pix), 0.02)
    flux = emu.predict(labels).astype(np.float64) + err * rng.standard_normal(err.shape)
    x = np.arange(emu.n_pix)
    for i in range(0, n, 3):
        for c in rng.choice(np.flatnonzero(~mask[20:-20]) + 20, 3, replace=False):
            flux[i] *= 1 - 0.2 * np.exp(-0.5 * ((x - c) / 2.0) ** 2)
    # the fit weighs only the pixels valid over its whole rv window: mask 20 pixels
    # at each chip end, so that those are the pixels unmasked here
    step = np.diff(np.log(emu.wavelength))
    cut = np.flatnonzero(step > 1.5 * np.median(step)) + 1
    ends = np.zeros(emu.n_pix, bool)
    for a, b in zip(np.r_[0, cut], np.r_[cut, emu.n_pix], strict=True):
        ends[a : a + 20] = ends[b - 20 : b] = True
    t = pl.fit(flux, err, emu, mask=mask | ends, return_model=True)
    w = np.where(mask | ends, 0.0, 1.0 / err**2)
    assert np.all(t["n_good_pixels"] == np.count_nonzero(w > 0, axis=1))
    want = max_dip(flux, w, np.asarray(t["model_flux"], np.float64))
    np.testing.assert_allclose(t["max_dip"], want, rtol=2e-3)
    lines = np.arange(n) % 3 == 0
    assert np.min(want[lines]) > np.max(want[~lines])


def test_lm_rows_replace_whole_rows():
    """The rescue and the rv polish keep a refit by rows: every field of a replaced
    row (the dip with the parameters) is the refit's, the others stay; a polish
    counts the steps of both fits."""
    from payne_lite.fitting._lm import LMRows

    def rows(v, it):
        return LMRows(
            p=np.full((3, 2), v), n_iter=np.full(3, it), conv=np.full(3, v > 1),
            chi2=np.full(3, v), a=np.full((3, 2, 2), v), g=np.full((3, 2), v),
            dip=np.full(3, 10.0 * v),
        )  # fmt: skip

    old, new = rows(1.0, 4), rows(2.0, 3)
    better = np.array([False, True, False])
    out = old.where(better, new)
    for mine, theirs, got in zip(old, new, out, strict=True):
        np.testing.assert_array_equal(got[1], theirs[1])
        np.testing.assert_array_equal(got[[0, 2]], mine[[0, 2]])
    assert old.where(better, new, add_iter=True).n_iter.tolist() == [4, 7, 4]


def test_catalog_residuals_propose_a_mask_that_finds_missing_lines(payne_apogee):
    """Mocks of the real network (S/N 100, rv fixed) with the same three lines
    missing from the model in every star (as lines missing from a training grid):
    the per-pixel residuals over the catalog mark the lines' cores and few other
    pixels, and the refit with the proposed mask moves the labels back toward the
    truth."""
    emu, mask = payne_apogee
    rng = np.random.default_rng(11)
    n = 150
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.25, 0.75, (n, lo.size))
    clean = emu.predict(labels).astype(np.float64)
    err = np.full_like(clean, 0.01)
    x = np.arange(clean.shape[1])
    centres = rng.choice(np.flatnonzero(~mask[50:-50]) + 50, 3, replace=False)
    lines = np.ones(clean.shape[1])
    for c in centres:
        lines *= 1 - 0.08 * np.exp(-0.5 * ((x - c) / 1.5) ** 2)
    flux = clean * lines + err * rng.standard_normal(clean.shape)
    kw = dict(mask=mask, fixed={"rv": 0.0})
    t = pl.fit(flux, err, emu, return_model=True, **kw)
    stats = pl.pixel_residuals(flux, err, t, mask=mask)
    proposed = stats.propose_mask()
    cores = np.zeros_like(mask)
    for c in centres:
        cores[c - 1 : c + 2] = True
    cores &= ~mask
    assert proposed[cores].all()
    assert proposed.sum() < cores.sum() + 20, proposed.sum()
    t2 = pl.fit(flux, err, emu, mask=mask | proposed, fixed={"rv": 0.0})
    names = list(emu.label_names)

    def bias(tab):  # |median fit - truth| per label, over its span
        return np.array(
            [
                abs(np.median(np.asarray(tab[k]) - labels[:, j])) / (hi[j] - lo[j])
                for j, k in enumerate(names)
            ]
        )

    assert bias(t2).sum() < 0.5 * bias(t).sum(), (bias(t), bias(t2))
    with pytest.raises(ValueError, match="return_model=True"):
        pl.pixel_residuals(flux, err, t2)
