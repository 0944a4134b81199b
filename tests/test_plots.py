"""Figures (payne_lite.plots) and ``payne-lite plot``.

Figure functions run on small synthetic inputs; the command runs on a results table
made by ``payne_lite.fit`` on six spectra simulated from the shipped default emulator
(one module fixture, a few seconds), and on a real APOGEE spectrum fitted with The
Payne's network (both shipped in ``data/payne_apogee``).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from astropy.table import Table
from scipy.special import erf

import payne_lite as pl
from payne_lite import plots
from payne_lite.cli import main
from payne_lite.demo import default_emulator_path, load_default_emulator
from payne_lite.plots import _files, _fits, _posterior

DEFAULT_EMULATOR = default_emulator_path()
NAMES = ["Teff", "logg", "[Fe/H]"]
UNITS = ["K", "dex", "dex"]


def assert_figure(paths, stem: Path | None = None) -> None:
    """[png, pdf] exist, are non-empty and are what their suffix says."""
    png, pdf = (Path(p) for p in paths)
    if stem is not None:
        assert (png, pdf) == (stem.with_suffix(".png"), stem.with_suffix(".pdf"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pdf.read_bytes()[:5] == b"%PDF-"
    assert png.stat().st_size > 5000 and pdf.stat().st_size > 2000


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, out, err, *fragments) -> None:
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("payne-lite: error: ") and "Traceback" not in err
    for frag in fragments:
        assert frag in lines[0], (frag, lines[0])


def spectrum(n_pix=600, seed=0):
    """A toy spectrum with a gap, lines, noise; one injected misfit and a mask."""
    rng = np.random.default_rng(seed)
    wave = np.concatenate(
        [
            np.linspace(15100, 15160, n_pix // 2),
            np.linspace(15200, 15260, n_pix - n_pix // 2),
        ]
    )
    centres = rng.uniform(15100, 15260, 40)
    depth = rng.uniform(0.05, 0.5, 40)
    depth[7], centres[7] = 0.95, 15230.0  # one very strong line
    model = 1.0 - (
        depth[:, None] * np.exp(-0.5 * ((wave[None] - centres[:, None]) / 0.3) ** 2)
    ).sum(0)
    model = np.clip(model, 0.02, None)
    err = np.full(n_pix, 0.01)
    flux = model + err * rng.standard_normal(n_pix)
    spike = (wave > 15120) & (wave < 15121)
    flux[spike] += 0.2  # a misfit the model does not have
    mask = np.zeros(n_pix, bool)
    mask[400:420] = True
    flux[405] = np.nan
    return SimpleNamespace(
        wave=wave, flux=flux, model=model, err=err, mask=mask, spike=spike
    )


# --------------------------------------------------------------------------------------
# figure functions write PNG and PDF
# --------------------------------------------------------------------------------------
def test_fit_vs_truth_writes_files(tmp_path):
    rng = np.random.default_rng(1)
    truth = rng.uniform([4000, 1, -2], [7000, 5, 0.5], (40, 3))
    err = np.array([50.0, 0.1, 0.05]) * np.ones((40, 3))
    fit = truth + err * rng.standard_normal((40, 3))
    fit[3, 1] = np.nan  # a failed fit is left out, not an error
    flagged = np.zeros(40, bool)
    flagged[:4] = True
    stem = tmp_path / "f" / "fit_vs_truth"
    assert_figure(
        plots.fit_vs_truth(
            truth,
            fit,
            err,
            NAMES,
            UNITS,
            stem,
            color=rng.uniform(30, 150, 40),
            color_label="S/N",
            flagged=flagged,
            title="test",
        ),
        stem,
    )


def test_fit_vs_truth_refuses_mismatched_shapes(tmp_path):
    with pytest.raises(ValueError, match=r"must have one shape"):
        plots.fit_vs_truth(
            np.zeros((4, 3)),
            np.zeros((4, 2)),
            np.zeros((4, 3)),
            NAMES,
            UNITS,
            tmp_path / "x",
        )


@pytest.mark.parametrize("with_err", [True, False])
def test_spectrum_with_model_writes_files(tmp_path, with_err):
    s = spectrum()
    stem = tmp_path / "spec"
    paths = plots.spectrum_with_model(
        s.wave,
        s.flux,
        s.model,
        stem,
        err=s.err if with_err else None,
        mask=s.mask,
        title="a long title " * 20,
        windows="auto",
        window_width=8.0,
    )
    assert_figure(paths, stem)


def test_spectrum_windows_given_full_range_only_and_bad_options(tmp_path):
    s = spectrum()
    assert_figure(
        plots.spectrum_with_model(
            s.wave, s.flux, s.model, tmp_path / "a", windows=[(15110, 15130), (1, 2)]
        )
    )
    assert_figure(
        plots.spectrum_with_model(s.wave, s.flux, s.model, tmp_path / "b", windows=None)
    )
    with pytest.raises(ValueError, match="needs err"):
        plots.spectrum_with_model(
            s.wave, s.flux, s.model, tmp_path / "c", residual="sigma"
        )
    with pytest.raises(ValueError, match="must all be"):
        plots.spectrum_with_model(s.wave, s.flux[:-1], s.model, tmp_path / "d")
    with pytest.raises(ValueError, match="windows must be"):
        plots.spectrum_with_model(
            s.wave, s.flux, s.model, tmp_path / "e", windows="all"
        )


def test_auto_windows_find_the_strongest_line_and_the_misfit():
    s = spectrum()
    resid = np.where(s.mask | ~np.isfinite(s.flux), np.nan, (s.flux - s.model) / s.err)
    bad = s.mask | ~np.isfinite(s.flux)
    wins = _fits._choose_windows(s.wave, s.model, resid, bad, "auto", 3, 8.0)
    assert len(wins) == 3
    assert [w[0] for w in wins] == sorted(w[0] for w in wins)  # by wavelength
    lines = [w for w in wins if w[2] == "strongest lines"]
    assert len(lines) == 1 and lines[0][0] < 15230.0 < lines[0][1]
    spike = s.wave[s.spike].mean()
    assert any(lo < spike < hi and why == "largest residuals" for lo, hi, why in wins)
    for (_, a1, _), (b0, _, _) in zip(wins, wins[1:], strict=False):
        assert a1 <= b0 + 1e-9  # no overlaps


def test_emulator_error_histogram_and_pixel_error_plot(tmp_path):
    rng = np.random.default_rng(2)
    resid = rng.normal(0, 1e-3, (30, 400)) * rng.uniform(0.2, 3.0, 400)
    assert_figure(plots.emulator_error_histogram(resid, tmp_path / "hist"))
    wave = np.linspace(15100, 15300, 400)
    assert_figure(
        plots.pixel_error_plot(
            wave, np.abs(resid).mean(0), tmp_path / "pix", title="emulator"
        )
    )
    with pytest.raises(ValueError, match=r"\(n_spec, n_pix\)"):
        plots.emulator_error_histogram(resid[0], tmp_path / "x")


@pytest.mark.parametrize(
    "history",
    [
        {
            "train_rms": np.geomspace(3e-2, 2e-3, 50),
            "valid_rms": np.geomspace(3e-2, 3e-3, 50),
            "valid_mae": np.geomspace(2e-2, 1e-3, 50),
            "seconds": np.arange(50.0),
            "n_active": np.arange(50),
        },  # an emulator's (train_emulator)
        {
            "train_nll": np.linspace(1.0, -2.0, 20),
            "valid_nll": np.r_[np.linspace(1.0, -1.8, 15), np.linspace(-1.7, -1.5, 5)],
        },  # an MDN's (train_mdn)
        {
            "train_loss": np.geomspace(1.0, 1e-3, 7),
            "valid_loss": np.geomspace(2, 2e-3, 7),
        },
    ],
    ids=["emulator", "mdn", "generic"],
)
def test_loss_curves_of_each_history(tmp_path, history):
    assert_figure(plots.loss_curves(history, tmp_path / "loss", title="t"))


def test_loss_curves_without_curves_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no train_\\* or valid_\\* curve"):
        plots.loss_curves({"seconds": np.arange(3.0)}, tmp_path / "loss")


# --------------------------------------------------------------------------------------
# calibration numbers
# --------------------------------------------------------------------------------------
def test_coverage_matches_hand_computation():
    truth = np.array(
        [[0.0, 10.0], [0.0, 10.0], [0.0, 10.0], [0.0, 10.0], [0.0, np.nan]]
    )
    mean = np.array([[0.5, 10.0], [-1.5, 13.0], [2.5, 10.0], [0.9, 11.0], [0.0, 10.0]])
    sigma = np.array([[1.0, 2.0], [1.0, 2.0], [1.0, 0.0], [1.0, 2.0], [1.0, 2.0]])
    # column 0: |d|/sigma = 0.5, 1.5, 2.5, 0.9, 0 -> within 1: 3/5, 2: 4/5, 3: 5/5
    # column 1: rows 2 (sigma 0) and 4 (NaN truth) left out: 0, 1.5, 0.5 -> 2/3, 3/3
    got = plots.coverage(truth, mean, sigma, [1.0, 2.0, 3.0])
    np.testing.assert_allclose(got, [[3 / 5, 2 / 3], [4 / 5, 1.0], [1.0, 1.0]])
    np.testing.assert_allclose(plots.coverage(truth, mean, sigma, 1.0), [3 / 5, 2 / 3])
    assert plots.coverage([0.0], [1.0], [1.0], 1.0)[0] == 1.0  # |d| = z sigma counts


def test_coverage_of_exact_gaussian_draws_is_erf():
    """Estimates drawn from N(truth, sigma): coverage = erf(z / sqrt 2) within 4
    binomial sigmas; sigmas quoted twice too small cover erf(z / 2 / sqrt 2)."""
    rng = np.random.default_rng(42)
    n, d = 20000, 3
    truth = rng.uniform(-5, 5, (n, d))
    sigma = rng.uniform(0.1, 3.0, (n, d))
    mean = truth + sigma * rng.standard_normal((n, d))
    z = np.array([0.5, 1.0, 2.0, 3.0])
    for quoted, expect in [
        (sigma, erf(z / math.sqrt(2))),
        (sigma / 2, erf(z / 2 / math.sqrt(2))),
    ]:
        got = plots.coverage(truth, mean, quoted, z)
        tol = 4 * np.sqrt(expect * (1 - expect) / n)
        assert np.all(np.abs(got - expect[:, None]) <= tol[:, None]), (got, expect)


def test_coverage_bad_input():
    with pytest.raises(ValueError, match="one shape"):
        plots.coverage(np.zeros((3, 2)), np.zeros((3, 2)), np.ones((2, 2)), 1.0)
    with pytest.raises(ValueError, match="z must be"):
        plots.coverage(np.zeros(3), np.zeros(3), np.ones(3), -1.0)
    assert np.isnan(plots.coverage([np.nan], [0.0], [1.0], 1.0)[0])


def test_coverage_plot_writes_files(tmp_path):
    rng = np.random.default_rng(3)
    truth = rng.normal(size=(300, 4))
    sigma = np.ones((300, 4))
    mean = truth + rng.normal(size=(300, 4)) * [1.0, 0.5, 2.0, 1.0]
    mean[:10, 3] = np.nan  # a column with fewer usable rows
    stem = tmp_path / "cov"
    assert_figure(
        plots.coverage_plot(truth, mean, sigma, [*NAMES, "rv"], stem, title="MDN"), stem
    )
    with pytest.raises(ValueError, match="no row has"):
        plots.coverage_plot(
            truth, np.full_like(mean, np.nan), sigma, [*NAMES, "rv"], tmp_path / "x"
        )


# --------------------------------------------------------------------------------------
# corner plot
# --------------------------------------------------------------------------------------
def test_corner_plot_of_a_known_gaussian(tmp_path):
    rng = np.random.default_rng(4)
    mu = np.array([5500.0, 4.4, -0.2, 12.3])
    sd = np.array([20.0, 0.05, 0.02, 0.1])
    corr = np.eye(4)
    corr[0, 1] = corr[1, 0] = 0.7
    samples = rng.multivariate_normal(mu, corr * np.outer(sd, sd), 5000)
    stem = tmp_path / "corner"
    paths = plots.corner_plot(
        samples,
        [*NAMES, "rv"],
        stem,
        units=[*UNITS, "km/s"],
        truths=mu,
        best=mu + 0.3 * sd,
        title="star 7",
    )
    assert_figure(paths, stem)
    assert_figure(plots.corner_plot(samples[:, :1], ["Teff"], tmp_path / "one"))


def _corner_contour_radii(monkeypatch, tmp_path, x, **kw) -> list[float]:
    """The median distance from the origin of each contour line that
    :func:`plots.corner_plot` draws in the lower-left panel of a 2-D corner plot."""
    figs = []
    save = _posterior.save_figure

    def keep(fig, stem):
        figs.append(fig)
        return save(fig, stem)

    monkeypatch.setattr(_posterior, "save_figure", keep)
    plots.corner_plot(x, ["a", "b"], tmp_path / "c", bins=40, **kw)
    (cs,) = [
        c for c in figs[0].axes[2].collections if getattr(c, "filled", True) is False
    ]
    return [float(np.median(np.hypot(*p.vertices.T))) for p in cs.get_paths()]


def test_corner_contours_enclose_the_gaussian_mass(monkeypatch, tmp_path):
    """corner draws the CORNER_LEVELS contours: for a 2-D standard Gaussian the
    39.3 % and 86.5 % regions are the circles r = 2 and r = 1 (outer level first),
    and weights are passed on: N(0, 2^2) draws weighted by N(0, 1) / N(0, 2^2) are
    the same Gaussian."""
    rng = np.random.default_rng(5)
    x = rng.standard_normal((100_000, 2))
    r = _corner_contour_radii(monkeypatch, tmp_path, x)
    np.testing.assert_allclose(r, [2.0, 1.0], rtol=0.05)
    wide = 2.0 * rng.standard_normal((200_000, 2))
    w = np.exp(-0.5 * np.sum(wide**2, axis=1) * (1.0 - 0.25))
    r = _corner_contour_radii(monkeypatch, tmp_path, wide, weights=w)
    np.testing.assert_allclose(r, [2.0, 1.0], rtol=0.06)


# --------------------------------------------------------------------------------------
# trace and prior-posterior plots
# --------------------------------------------------------------------------------------
def test_trace_plot_writes_files(tmp_path):
    rng = np.random.default_rng(0)
    chains = rng.normal([5500.0, 4.4, -0.2], [50.0, 0.1, 0.05], (300, 12, 3))
    stem = tmp_path / "trace"
    paths = plots.trace_plot(
        chains,
        NAMES,
        stem,
        units=UNITS,
        truths=[5520.0, 4.4, -0.2],
        title="12 chains, 8 drawn",
    )
    assert_figure(paths, stem)
    # one chain, (n, d)
    assert_figure(plots.trace_plot(chains[:, 0], NAMES, tmp_path / "one"))


def test_trace_plot_bad_input(tmp_path):
    with pytest.raises(ValueError, match="n_steps >= 2"):
        plots.trace_plot(np.zeros((1, 2, 3)), NAMES, tmp_path / "t")
    with pytest.raises(ValueError, match="3 names and 3 units for 2"):
        plots.trace_plot(np.zeros((5, 2, 2)), NAMES, tmp_path / "t", units=UNITS)
    with pytest.raises(ValueError, match="non-finite"):
        plots.trace_plot(np.full((5, 2, 3), np.nan), NAMES, tmp_path / "t")
    with pytest.raises(ValueError, match=r"truths \(2,\) must be \(3,\)"):
        plots.trace_plot(np.zeros((5, 2, 3)), NAMES, tmp_path / "t", truths=[1, 2])


@pytest.mark.parametrize("weighted", [False, True])
def test_prior_posterior_plot_writes_files(tmp_path, weighted):
    rng = np.random.default_rng(1)
    x = rng.normal([5500.0, 4.4, -0.2], [30.0, 0.05, 0.04], (4000, 3))
    lo, hi = np.array([4000.0, 1.0, -2.0]), np.array([7000.0, 5.0, 0.5])
    mu, sd = np.array([0.0, 4.3, 0.0]), np.array([np.inf, 0.2, np.inf])  # one Gauss
    w = rng.uniform(0.5, 1.5, 4000) if weighted else None
    stem = tmp_path / "prior_post"
    paths = plots.prior_posterior_plot(
        x,
        NAMES,
        stem,
        prior_lo=lo,
        prior_hi=hi,
        prior_mu=mu,
        prior_sd=sd,
        weights=w,
        units=UNITS,
        truths=[5510.0, 4.4, -0.21],
        title="test",
    )
    assert_figure(paths, stem)


def test_prior_posterior_plot_bad_input(tmp_path):
    x = np.zeros((10, 3)) + [5500.0, 4.4, -0.2]
    kw = dict(prior_lo=[4000.0, 1.0, -2.0], prior_hi=[7000.0, 5.0, 0.5])
    with pytest.raises(ValueError, match="lo < hi"):
        plots.prior_posterior_plot(
            x, NAMES, tmp_path / "p", prior_lo=kw["prior_hi"], prior_hi=kw["prior_lo"]
        )
    with pytest.raises(ValueError, match=r"prior_lo \(2,\) must be \(3,\)"):
        plots.prior_posterior_plot(
            x, NAMES, tmp_path / "p", prior_lo=[1.0, 2.0], prior_hi=kw["prior_hi"]
        )
    with pytest.raises(ValueError, match="weights must be"):
        plots.prior_posterior_plot(x, NAMES, tmp_path / "p", weights=np.ones(3), **kw)
    with pytest.raises(ValueError, match="n >= 2"):
        plots.prior_posterior_plot(x[:1], NAMES, tmp_path / "p", **kw)


def test_plot_samples_file(capsys, tmp_path):
    """`payne-lite plot SAMPLES`: traces, prior-posterior and corner per star, from
    the file payne_lite.save_samples writes from payne_lite.sample(...,
    return_samples=True) (emcee, a short chain)."""
    from conftest import build_tiny_emulator

    emu = build_tiny_emulator(60, seed=4)
    rng = np.random.default_rng(2)
    truth = np.array([[5200.0, 3.0, -0.5], [6000.0, 4.0, -1.0]])
    flux = np.asarray(emu.predict(truth)) + rng.normal(0.0, 0.01, (2, 60))
    path = tmp_path / "samples.h5"
    with warnings.catch_warnings():  # a deliberately short chain
        warnings.simplefilter("ignore", pl.SamplingWarning)
        t, samples = pl.sample(
            flux,
            np.full_like(flux, 0.01),
            emu,
            fixed={"rv": 0.0},
            options=pl.EmceeOptions(n_walkers=16, n_steps=60, check_every=60),
            return_samples=True,
        )
    pl.save_samples(path, samples, t.meta)
    code, out, err = run(capsys, "plot", path, "-o", tmp_path / "figs")
    assert code == 0, err
    for star in (0, 1):
        for kind in ("trace", "prior_posterior", "corner"):
            stem = tmp_path / "figs" / f"{kind}_star{star}"
            assert_figure([stem.with_suffix(".png"), stem.with_suffix(".pdf")])
    assert "traces of 16 chains (emcee)" in out
    code, out, err = run(capsys, "plot", path, "-o", tmp_path / "f2", "--rows", "1")
    assert code == 0 and (tmp_path / "f2" / "trace_star1.png").exists()
    assert not (tmp_path / "f2" / "trace_star0.png").exists()
    assert_one_line_error(
        *run(capsys, "plot", path, "--rows", "5"),
        "rows [5] out of range (it has 2 stars)",
    )
    post, meta = pl.posterior.load_samples(path)
    assert post.n_chains == [16, 16] and meta["method"] == "emcee"
    np.testing.assert_allclose(post.prior_lo[0], [*emu.label_lo, -20.0][:3])


def test_corner_plot_bad_input(tmp_path):
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match="names"):
        plots.corner_plot(x, ["a"], tmp_path / "c")
    with pytest.raises(ValueError, match=r"truths \(3,\) must be \(2,\)"):
        plots.corner_plot(x, ["a", "b"], tmp_path / "c", truths=[1, 2, 3])
    with pytest.raises(ValueError, match="non-finite"):
        plots.corner_plot(np.full((10, 2), np.nan), ["a", "b"], tmp_path / "c")
    with pytest.raises(ValueError, match="n >= d"):
        plots.corner_plot(np.zeros((2, 3)), ["a", "b", "c"], tmp_path / "c")
    with pytest.raises(ValueError, match="weights"):
        plots.corner_plot(x, ["a", "b"], tmp_path / "c", weights=-np.ones(10))


# --------------------------------------------------------------------------------------
# payne-lite plot
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> SimpleNamespace:
    """Six spectra simulated from the default emulator (rv, noise, a masked chunk),
    fitted with payne_lite.fit: results.fits, truth.ecsv and catalog.h5."""
    if not DEFAULT_EMULATOR.exists():
        pytest.skip(f"{DEFAULT_EMULATOR} not in this checkout")
    from payne_lite.demo import _shift_all
    from payne_lite.observe import doppler_shift

    d = tmp_path_factory.mktemp("plot")
    emu = load_default_emulator(progress=False)
    rng = np.random.default_rng(7)
    n = 6
    span = emu.label_hi - emu.label_lo
    labels = emu.label_lo + span * rng.uniform(0.15, 0.85, (n, emu.n_labels))
    rv = rng.uniform(-80, 80, n)
    obs, ok = (
        np.asarray(a)
        for a in _shift_all(doppler_shift, emu.wavelength, emu.predict(labels), rv)
    )
    snr = rng.uniform(40, 120, n)
    err = np.where(ok, np.abs(obs) / snr[:, None], np.inf)
    flux = np.where(ok, obs + err * rng.standard_normal(obs.shape), np.nan)
    mask = np.zeros(flux.shape, bool)
    mask[:, 2000:2030] = True
    ids = [f"star{i}" for i in range(n)]
    pl.write_catalog(d / "catalog.h5", flux, err, emu.wavelength, mask=mask, ids=ids)
    res = pl.fit(flux, err, emu, mask=mask, rv_range=(-100, 100), progress=False)
    res["id"] = ids
    pl.write_results(res, d / "results.fits")
    truth = Table({name: labels[:, j] for j, name in enumerate(emu.label_names)})
    truth["rv"], truth["snr"] = rv, snr
    truth.write(d / "truth.ecsv")
    return SimpleNamespace(
        dir=d,
        emu=DEFAULT_EMULATOR,
        results=d / "results.fits",
        truth=d / "truth.ecsv",
        catalog=d / "catalog.h5",
        table=res,
        flux=flux,
        n=n,
    )


def written(out: str) -> set[str]:
    """Names of the PNGs listed by `payne-lite plot`."""
    return {
        Path(line.split()[1]).name
        for line in out.splitlines()
        if line.strip().startswith("wrote ")
    }


def test_plot_results_truth_spectra_and_emulator(fitted, capsys):
    out_dir = fitted.dir / "figs"
    code, out, err = run(
        capsys,
        "plot",
        fitted.results,
        "--truth",
        fitted.truth,
        "--spectra",
        fitted.catalog,
        "--emulator",
        fitted.emu,
        "-o",
        out_dir,
        "--rows",
        "5",
        "--windows",
        "15200-15260,16100-16150",
    )
    assert code == 0, err
    expect = {
        "fit_vs_truth",
        "fit_coverage",
        "emulator_loss",
        "emulator_pixel_error",
        "spectrum_row5",
    }
    assert written(out) == {f"{s}.png" for s in expect}
    for s in expect:
        assert_figure([out_dir / f"{s}.png", out_dir / f"{s}.pdf"])
    assert "of row 5 (star5)" in out
    assert "skipped:" in out and "no MDN calibration" in out
    assert out.startswith(f"payne-lite plot: {len(expect)} figure(s) in {out_dir}")


def test_default_rows_are_median_and_highest_chi2_red():
    t = Table({"chi2_red": [1.0, np.nan, 3.0, 0.5, 2.0]})
    assert _files._default_rows(t) == [(0, "median chi2_red"), (2, "highest chi2_red")]
    assert _files._default_rows(Table({"chi2_red": [1.0]})) == [(0, "median chi2_red")]
    assert _files._default_rows(Table({"x": [1.0]})) == [(0, "first row")]


def test_plot_mdn_calibration_from_mdn_columns(fitted, capsys, tmp_path):
    """Results of `fit --mdn` carry <name>_mdn and <name>_mdn_sigma: mdn_coverage."""
    res = fitted.table.copy()
    truth = Table.read(fitted.truth)
    rng = np.random.default_rng(8)
    for name in [*load_default_emulator(progress=False).label_names, "rv"]:
        sigma = np.abs(np.asarray(res[f"{name}_err"])) * 5 + 1e-3
        res[f"{name}_mdn_sigma"] = sigma
        res[f"{name}_mdn"] = np.asarray(truth[name]) + sigma * rng.standard_normal(
            len(res)
        )
    pl.write_results(res, tmp_path / "res_mdn.ecsv")
    code, out, err = run(
        capsys,
        "plot",
        tmp_path / "res_mdn.ecsv",
        "--truth",
        fitted.truth,
        "-o",
        tmp_path / "figs",
    )
    assert code == 0, err
    assert written(out) == {"fit_vs_truth.png", "fit_coverage.png", "mdn_coverage.png"}
    assert "coverage of the MDN sigmas, 6 parameters" in out


def test_plot_model_flux_column_needs_no_emulator(fitted, capsys, tmp_path):
    res = fitted.table.copy()
    res["model_flux"] = np.nan_to_num(fitted.flux, nan=1.0)
    pl.write_results(res, tmp_path / "res.h5")
    code, out, err = run(
        capsys,
        "plot",
        tmp_path / "res.h5",
        "--spectra",
        fitted.catalog,
        "--rows",
        "2",
        "-o",
        tmp_path / "figs",
    )
    assert code == 0, err
    assert written(out) == {"spectrum_row2.png"}


def test_plot_emulator_file_as_results_and_mdn_loss(capsys, tmp_path):
    """An emulator or MDN file in RESULTS' place: its loss curves."""
    from test_fit import smooth_emulator

    emu = smooth_emulator(n_pix=200)
    mdn = pl.train_mdn(
        emu,
        n_train=256,
        n_valid=64,
        epochs=3,
        n_pca=4,
        hidden=(8,),
        batch_size=64,
        rv_range=(-50, 50),
        seed=0,
        progress=False,
    )
    mdn.save(tmp_path / "mdn.h5")
    code, out, err = run(capsys, "plot", tmp_path / "mdn.h5", "-o", tmp_path / "a")
    assert code == 0, err
    assert written(out) == {"mdn_loss.png"}
    assert "MDN training and validation loss (3 epochs)" in out
    code, out, err = run(
        capsys, "plot", "--mdn", tmp_path / "mdn.h5", "-o", tmp_path / "b"
    )
    assert code == 0 and written(out) == {"mdn_loss.png"}
    # an emulator without training history or pixel errors: nothing to draw
    emu.save(tmp_path / "emu.h5")
    code, out, err = run(capsys, "plot", tmp_path / "emu.h5", "-o", tmp_path / "c")
    assert_one_line_error(code, out, err, "nothing to plot", "no training history")


def test_plot_emulator_figures(capsys, tmp_path):
    if not DEFAULT_EMULATOR.exists():
        pytest.skip(f"{DEFAULT_EMULATOR} not in this checkout")
    code, out, err = run(capsys, "plot", "--emulator", DEFAULT_EMULATOR, "-o", tmp_path)
    assert code == 0, err
    assert written(out) == {"emulator_loss.png", "emulator_pixel_error.png"}
    assert "(150 iterations)" in out


def test_plot_help(capsys):
    code, text, _ = run(capsys, "plot", "--help")
    assert code == 0
    for frag in (
        "--truth TRUTH",
        "--spectra CATALOG",
        "fit_vs_truth",
        "mdn_coverage",
        "emulator_loss",
        "examples:",
    ):
        assert frag in text


# --- bad input: one line, exit code 2 --------------------------------------------
def test_plot_missing_file(capsys, tmp_path):
    code, out, err = run(
        capsys, "plot", tmp_path / "nope.fits", "--truth", tmp_path / "t.ecsv"
    )
    assert_one_line_error(code, out, err, "nope.fits: no such file")


def test_plot_nothing_to_plot(capsys, tmp_path):
    code, out, err = run(capsys, "plot", "-o", tmp_path)
    assert_one_line_error(code, out, err, "nothing to plot")


def test_plot_results_alone(fitted, capsys):
    code, out, err = run(capsys, "plot", fitted.results)
    assert_one_line_error(code, out, err, "results table alone makes no figure")


def test_plot_table_without_fit_columns(fitted, capsys, tmp_path):
    Table({"a": [1.0, 2.0], "b": [3.0, 4.0]}).write(tmp_path / "t.ecsv")
    code, out, err = run(capsys, "plot", tmp_path / "t.ecsv", "--truth", fitted.truth)
    assert_one_line_error(
        code, out, err, "t.ecsv: no fitted parameter columns", "Teff_err"
    )


def test_plot_truth_without_label_columns(fitted, capsys, tmp_path):
    Table({"x": np.zeros(fitted.n)}).write(tmp_path / "t.ecsv")
    code, out, err = run(capsys, "plot", fitted.results, "--truth", tmp_path / "t.ecsv")
    assert_one_line_error(code, out, err, "none of the fitted parameters", "Teff, logg")


def test_plot_truth_with_other_rows(fitted, capsys, tmp_path):
    Table.read(fitted.truth)[:3].write(tmp_path / "t.ecsv")
    code, out, err = run(capsys, "plot", fitted.results, "--truth", tmp_path / "t.ecsv")
    assert_one_line_error(code, out, err, "has 6 rows", "t.ecsv 3")


def test_plot_truth_ids_missing(fitted, capsys, tmp_path):
    t = Table.read(fitted.truth)
    t["id"] = [f"other{i}" for i in range(len(t))]
    t.write(tmp_path / "t.ecsv")
    code, out, err = run(capsys, "plot", fitted.results, "--truth", tmp_path / "t.ecsv")
    assert_one_line_error(code, out, err, "no row for id 'star0'")


def test_plot_spectra_need_an_emulator(fitted, capsys):
    code, out, err = run(capsys, "plot", fitted.results, "--spectra", fitted.catalog)
    assert_one_line_error(code, out, err, "no model_flux column", "emulator")


def test_plot_row_out_of_range(fitted, capsys):
    code, out, err = run(
        capsys,
        "plot",
        fitted.results,
        "--spectra",
        fitted.catalog,
        "--emulator",
        fitted.emu,
        "--rows",
        "6",
    )
    assert_one_line_error(code, out, err, "row 6 is not one of the 6 rows")


@pytest.mark.parametrize(
    "flags, msg",
    [
        (["--rows", "a,b"], "--rows 'a,b'"),
        (["--windows", "15200"], "expected auto or LO-HI"),
        (["--window-width", "0"], "--window-width must be > 0"),
    ],
)
def test_plot_bad_options(fitted, capsys, flags, msg):
    code, out, err = run(
        capsys,
        "plot",
        fitted.results,
        "--spectra",
        fitted.catalog,
        "--emulator",
        fitted.emu,
        *flags,
    )
    assert_one_line_error(code, out, err, msg)


def test_plot_truth_without_results(fitted, capsys):
    code, out, err = run(
        capsys, "plot", "--truth", fitted.truth, "--emulator", fitted.emu
    )
    assert_one_line_error(code, out, err, "give the results table too")


# --------------------------------------------------------------------------------------
# real data: an APOGEE spectrum and The Payne's network
# --------------------------------------------------------------------------------------
def test_plot_real_apogee_spectrum(payne_data, capsys, tmp_path):
    wave, mask = payne_data.wavelength, payne_data.mask
    emu = payne_data.emulator()
    emu.save(tmp_path / "payne.h5")
    spec = payne_data.combined_spectrum()
    flux, err = spec.flux[None], spec.flux_err[None]
    pl.write_catalog(
        tmp_path / "cat.h5",
        flux,
        err,
        wave,
        mask=mask[None],
        ids=["2M13012770+5754582"],
    )
    res = pl.fit(flux, err, emu, mask=mask, fixed={"rv": 0.0}, progress=False)
    res["id"] = ["2M13012770+5754582"]
    pl.write_results(res, tmp_path / "res.fits")
    code, out, err_text = run(
        capsys,
        "plot",
        tmp_path / "res.fits",
        "--spectra",
        tmp_path / "cat.h5",
        "--emulator",
        tmp_path / "payne.h5",
        "-o",
        tmp_path / "figs",
    )
    assert code == 0, err_text
    assert written(out) == {"spectrum_row0.png"}
    assert "no training history" in out  # The Payne's networks carry none
    assert_figure(
        [
            tmp_path / "figs" / "spectrum_row0.png",
            tmp_path / "figs" / "spectrum_row0.pdf",
        ]
    )


def test_plot_spectra_of_a_joint_fit_draw_each_visit(
    payne_data, capsys, tmp_path, monkeypatch
):
    """Results of a joint fit of visits (one row per star) against their catalog
    (one row per visit): ``--rows`` are catalog rows, and each visit is drawn
    with the joint model at its own rv, which is the joint fit's own model of that
    visit (``return_model=True``) to float32 rounding."""
    emu = payne_data.emulator()
    emu.save(tmp_path / "payne.h5")
    v, single = payne_data.visits(), payne_data.combined_spectrum()
    flux = np.vstack([v.flux[:2], single.flux[None], v.flux[2:]])
    err = np.vstack([v.flux_err[:2], single.flux_err[None], v.flux_err[2:]])
    stars = ["sb2", "sb2", "single", "sb2"]
    ids = ["v1", "v2", "single", "v3"]
    wave = payne_data.wavelength
    pl.write_catalog(tmp_path / "cat.h5", flux, err, wave, ids=ids, group=stars)
    res = pl.fit(flux, err, emu, group=stars, return_model=True, emulator_error=False)
    models = np.asarray(res["model_flux"])  # (n_star, V, P)
    res.remove_column("model_flux")
    pl.write_results(res, tmp_path / "res.fits")
    drawn = {}
    real = _files.spectrum_with_model

    def keep(w, f, model, stem, **kw):
        drawn[Path(stem).name] = (np.asarray(model), kw["title"])
        return real(w, f, model, stem, **kw)

    monkeypatch.setattr(_files, "spectrum_with_model", keep)
    code, out, err_text = run(
        capsys, "plot", tmp_path / "res.fits", "--spectra", tmp_path / "cat.h5",
        "--emulator", tmp_path / "payne.h5", "-o", tmp_path / "figs", "--rows", "1,3",
    )  # fmt: skip
    assert code == 0, err_text
    assert written(out) == {"spectrum_row1.png", "spectrum_row3.png"}
    for row, (s, visit) in {1: (0, 1), 3: (0, 2)}.items():
        model, title = drawn[f"spectrum_row{row}"]
        assert f"row {row} ({ids[row]})" in title
        ok = np.isfinite(models[s, visit])
        np.testing.assert_allclose(model[ok], models[s, visit][ok], rtol=2e-5)
