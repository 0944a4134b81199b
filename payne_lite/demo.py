"""``payne-lite demo``: the main job on the embedded default, nothing downloaded.

It loads (or, if missing, builds) the default emulator of the built-in synthesizer,
draws a catalog of spectra with known labels that the emulator never saw (made by the
synthesizer itself, so the emulator's own error is part of the test), checks the
emulator against the synthesizer on them, observes them (random radial velocity in
+-200 km/s, Gaussian noise at an S/N drawn in 30-150), fits them with the batched
Levenberg-Marquardt fitter started and bounded by the default MDN (and, for
comparison, from the MDN-free multi-start default), and writes the truth and
results tables and figures, and samples the posterior of a few stars with emcee.

The default emulator and MDN are the files the package ships
(:func:`payne_lite._datafiles.shipped_file`); what is built or trained when they are
missing (or, for the MDN, made for another emulator) is saved into the user cache
(:func:`payne_lite._datafiles.cache_dir`), never next to the package.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from . import _datafiles
from .emulator import Emulator

log = logging.getLogger(__name__)

#: Stars of the catalog sampled with emcee, and the cap on its steps per star.
N_EMCEE = 3
EMCEE_MAX_STEPS = 6000
#: The simulated catalog: |rv| up to RV_MAX [km/s], S/N uniform in SNR_RANGE.
RV_MAX = 200.0
SNR_RANGE = (30.0, 150.0)


def default_emulator_path() -> Path:
    """The default emulator's file: the shipped one (``data/default_emulator.h5``,
    made by ``data/make_default_emulator.py``), else its place in the user cache,
    where :func:`load_default_emulator` builds it (that file may not exist yet)."""
    return _shipped_or_cached(_datafiles.DEFAULT_EMULATOR)


def default_mdn_path() -> Path:
    """The default MDN's file: the shipped one (``data/default_mdn.h5``, made by
    ``data/make_default_mdn.py`` for the default emulator), else its place in the
    user cache (that file may not exist yet)."""
    return _shipped_or_cached(_datafiles.DEFAULT_MDN)


def _shipped_or_cached(name: str) -> Path:
    return _datafiles.shipped_file(name) or _datafiles.cache_dir() / name


def load_default_emulator(
    path: Path | None = None, *, progress: bool = True
) -> Emulator:
    """The default emulator: from ``path`` (default :func:`default_emulator_path`),
    else built.

    Building it from scratch (no file) makes the default grid and trains on it, as
    ``data/make_default_emulator.py`` does, and saves it to ``path``, or without
    ``path`` into the user cache: a few minutes.
    """
    from .emulator import train_emulator
    from .grid import synth

    path = Path(path) if path is not None else default_emulator_path()
    if path.exists():
        return Emulator.load(path)
    log.warning(
        "%s not found: building the default grid and emulator (a few minutes)", path
    )
    grid = synth.make_grid(2000, seed=0, progress=progress)
    emu = train_emulator(grid, hidden=10, seed=0, max_iter=150, progress=progress)
    emu.save(path)
    return emu


def load_default_mdn(
    emulator: Emulator, path: Path | None = None, *, progress: bool = True
):
    """The default MDN for ``emulator``.

    With ``path``: the MDN of that file when it was trained for this emulator, else
    one trained on the spot (a few minutes; as ``data/make_default_mdn.py`` does,
    with 30,000 training spectra) and saved to ``path``. Without: the shipped MDN
    (:func:`default_mdn_path`) or the one in the user cache, whichever was trained
    for this emulator, else one trained on the spot and saved into the user cache
    (the shipped file is never replaced).
    """
    from .mdn import MDN, train_mdn

    if path is not None:
        candidates, target = [Path(path)], Path(path)
    else:
        target = _datafiles.cache_dir() / _datafiles.DEFAULT_MDN
        candidates = [default_mdn_path(), target]
    for candidate in dict.fromkeys(candidates):  # the cache may be the default
        if not candidate.exists():
            continue
        try:
            return MDN.load(candidate, emulator=emulator)
        except ValueError as err:  # trained for another emulator, or unreadable
            log.warning("%s: %s; not using it", candidate, err)
    log.warning(
        "no MDN for this emulator in %s: training one into %s (a few minutes)",
        " or ".join(str(c) for c in dict.fromkeys(candidates)),
        target,
    )
    mdn = train_mdn(emulator, n_train=30_000, n_valid=5_000, seed=0, progress=progress)
    mdn.save(target)
    return mdn


def run_demo(
    outdir: str | Path = "payne_lite_demo",
    *,
    n_spec: int = 300,
    seed: int = 1,
    emulator: str | Path | None = None,
    mdn: str | Path | None = None,
    n_emcee: int = N_EMCEE,
    progress: bool = True,
) -> dict:
    """Run the demo; returns the summary numbers it prints.

    Writes into ``outdir``: ``catalog_truth.ecsv`` (labels, rv and S/N of the simulated
    catalog and the emulator's error on each spectrum), ``catalog.h5`` (the simulated
    observations, for ``payne-lite fit`` / ``plot``), ``results.fits`` (the fit, see
    :func:`payne_lite.fit`, MDN starts and bounds, with the MDN's means and sigmas in
    ``<label>_mdn`` / ``<label>_mdn_sigma``) and ``figures/`` (PNG and PDF).
    ``posterior_emcee.ecsv``: emcee posterior summaries of the first ``n_emcee``
    stars (their corner plot in ``figures/``).
    ``mdn``: an MDN file for the emulator (default: see :func:`load_default_mdn`;
    trained on the spot if missing or made for another emulator).
    """
    outdir = Path(outdir)
    (outdir / "figures").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    emu = load_default_emulator(
        None if emulator is None else Path(emulator), progress=progress
    )
    mdn_model = load_default_mdn(
        emu, None if mdn is None else Path(mdn), progress=progress
    )
    t_load = time.perf_counter() - t0

    cat = _simulate_catalog(emu, n_spec, seed, outdir)
    fits = _fit_catalog(cat, emu, mdn_model, outdir, progress)
    res = fits.res
    params = [*emu.label_names, "rv"]
    truth = np.column_stack([cat.labels, cat.rv])
    got = np.column_stack([np.asarray(res[n], float) for n in params])
    got_err = np.column_stack([np.asarray(res[f"{n}_err"], float) for n in params])
    _demo_figures(outdir / "figures", emu, mdn_model, cat, fits, truth, got, got_err)
    emcee = _emcee_stars(
        cat,
        emu,
        mdn_model,
        outdir,
        truth,
        got,
        n_emcee=n_emcee,
        seed=seed,
        progress=progress,
    )
    return _summary(
        cat, fits, emcee, emu, truth, got, got_err, t_load=t_load, t0=t0, outdir=outdir
    )


def _simulate_catalog(emu: Emulator, n_spec: int, seed: int, outdir: Path):
    """The demo's catalog: labels drawn uniformly in the synthesizer's box, their
    spectra from the synthesizer and the emulator (timed), then observed: the
    synthesizer evaluated at each star's rest wavelengths ``lambda / f(rv)`` (rv
    uniform in +-RV_MAX km/s, the relativistic factor; pixels whose rest
    wavelength is off the emulator's grid are masked), and Gaussian noise at an
    S/N uniform in SNR_RANGE. Writes ``outdir/catalog_truth.ecsv``.

    Returns:
        A namespace: ``labels`` (n_spec, L); ``truth_flux``, ``model_flux`` (n_spec, P)
        synthesizer and emulator spectra and ``resid`` their difference [normalised
        flux]; ``rv`` [km/s], ``snr`` (n_spec,); ``observed`` (n_spec, P) the
        synthesizer's spectra at each rv, before noise; ``noisy``, ``err`` (n_spec, P) the
        observations and their 1-sigma errors (NaN / inf off the grid); ``ok``
        (n_spec, P) bool, pixel on the grid; ``table`` the truth table; ``t_synth``,
        ``t_emu`` the seconds to synthesize and to emulate the catalog.
    """
    from astropy.table import Table

    from .constants import C_KMS
    from .grid import synth
    from .observe import doppler_shift

    labels = synth.sample_labels(n_spec, seed=seed, method="uniform")
    wave = np.asarray(emu.wavelength, np.float64)
    # synthesize's default line list, fixed here: its default covers the grid it
    # is given, and a shifted grid would get other lines (another star)
    lines = synth.make_linelist(
        synth.DEFAULT_N_LINES,
        seed=0,
        wavelength_range=(
            min(synth.DEFAULT_LAM_MIN, wave[0]),
            max(synth.DEFAULT_LAM_MAX, wave[-1]),
        ),
    )
    t = time.perf_counter()
    truth_flux = synth.synthesize(labels, wavelength=wave, linelist=lines)
    t_synth = time.perf_counter() - t
    emu.predict(labels)  # compile for this batch shape outside the timing
    t = time.perf_counter()
    model_flux = emu.predict(labels)
    t_emu = time.perf_counter() - t
    resid = model_flux - truth_flux

    table = Table({name: labels[:, j] for j, name in enumerate(emu.label_names)})
    for name, unit in zip(emu.label_names, emu.label_units, strict=True):
        table[name].unit = unit or None
        table[name].description = f"true {name}"
    table["emu_median_abs_err"] = np.median(np.abs(resid), axis=1)
    table["emu_rms_err"] = np.sqrt(np.mean(resid**2, axis=1))

    # Observe: an exact Doppler shift, the synthesizer evaluated at lambda / f(rv)
    # (shifting the rest-frame spectra by interpolation blurs them by an amount that
    # depends on the rv's pixel phase: a model error of the mocks' own, which the fit
    # read as macroturbulence, 0.6 km/s too high with linear interpolation), then
    # noise. Pixels whose rest wavelength is off the emulator's grid are masked.
    rng = np.random.default_rng(seed + 1)
    rv = rng.uniform(-RV_MAX, RV_MAX, n_spec)
    snr = rng.uniform(*SNR_RANGE, n_spec)
    beta = rv / C_KMS
    factor = np.sqrt((1.0 + beta) / (1.0 - beta))
    obs = np.stack(
        [
            synth.synthesize(lab, wavelength=wave / f, linelist=lines)
            for lab, f in zip(labels, factor, strict=True)
        ]
    ).astype(np.float64)
    # the same pixels the fitter's model can see: rest wavelength on its grid
    _, ok = (np.asarray(a) for a in _shift_all(doppler_shift, wave, truth_flux, rv))
    err = np.where(ok, 1.0, np.inf) * np.abs(obs) / snr[:, None]
    noisy = np.where(ok, obs + err * rng.standard_normal(obs.shape), np.nan)
    err = np.where(ok, err, np.inf)
    table["rv"], table["snr"] = rv, snr
    table["rv"].unit = "km/s"
    table.meta["emulator"] = repr(emu)
    table.write(outdir / "catalog_truth.ecsv", overwrite=True)
    return SimpleNamespace(
        labels=labels,
        truth_flux=truth_flux,
        model_flux=model_flux,
        resid=resid,
        rv=rv,
        snr=snr,
        observed=obs,
        noisy=noisy,
        err=err,
        ok=ok,
        table=table,
        t_synth=t_synth,
        t_emu=t_emu,
    )


def _fit_catalog(cat, emu: Emulator, mdn_model, outdir: Path, progress: bool):
    """Fit the catalog of :func:`_simulate_catalog` with the MDN's starts and bounds
    and without the MDN, each path twice (the first call compiles for these batch
    shapes, the second is timed without compilation); writes
    ``outdir/results.fits`` (MDN fit, without its models) and ``outdir/catalog.h5``.

    Returns:
        A namespace: ``res`` the MDN fit's table, ``model_fit`` (n_spec, P) its
        best-fit models, ``res_plain`` the MDN-free fit's table; ``t_fit_first``,
        ``t_fit``, ``t_plain`` [s]: the MDN fit's first (compiling) and second call,
        the MDN-free fit's second call.
    """
    from ._api import fit
    from .catalog import write_catalog, write_results

    noisy, err = cat.noisy, cat.err
    t = time.perf_counter()
    res = fit(noisy, err, emu, mdn=mdn_model, return_model=True, progress=progress)
    t_fit_first = time.perf_counter() - t
    t = time.perf_counter()
    fit(noisy, err, emu, mdn=mdn_model)
    t_fit = time.perf_counter() - t
    model_fit = np.asarray(res["model_flux"])
    del res["model_flux"]  # 20 MB; `payne-lite plot` rebuilds it from the emulator
    write_results(res, outdir / "results.fits", overwrite=True)
    write_catalog(
        outdir / "catalog.h5", noisy, err, emu.wavelength, mask=~cat.ok, overwrite=True
    )
    fit(noisy, err, emu, progress=progress)
    t = time.perf_counter()
    res_plain = fit(noisy, err, emu)
    t_plain = time.perf_counter() - t
    return SimpleNamespace(
        res=res,
        model_fit=model_fit,
        res_plain=res_plain,
        t_fit_first=t_fit_first,
        t_fit=t_fit,
        t_plain=t_plain,
    )


def _demo_figures(figs: Path, emu, mdn_model, cat, fits, truth, got, got_err) -> None:
    """The demo's figures in ``figs``: emulator error and spectra, training losses,
    fit minus truth, calibration of the MDN and of the fit errors, an example fit.

    Args:
        cat, fits: from :func:`_simulate_catalog` and :func:`_fit_catalog`.
        truth, got, got_err: (n_spec, L + 1) true labels and rv, the MDN fit's
            values and 1-sigma errors.
    """
    from . import plots

    res, labels, ok = fits.res, cat.labels, cat.ok
    params = [*emu.label_names, "rv"]
    names = dict(data_label="synthesizer", model_label="emulator")
    plots.emulator_error_histogram(cat.resid, figs / "emulator_error_hist")
    worst = int(np.argmax(cat.table["emu_rms_err"]))
    plots.spectrum_with_model(
        emu.wavelength,
        cat.truth_flux[worst],
        cat.model_flux[worst],
        figs / "spectrum_model_worst",
        title=_label_text(emu, labels[worst]) + "  (worst of catalog)",
        **names,
    )
    plots.spectrum_with_model(
        emu.wavelength,
        cat.truth_flux[0],
        cat.model_flux[0],
        figs / "spectrum_model_example",
        title=_label_text(emu, labels[0]),
        **names,
    )
    if emu.history:
        plots.loss_curves(emu.history, figs / "training_loss")
    plots.fit_vs_truth(
        truth,
        got,
        got_err,
        params,
        [*emu.label_units, "km/s"],
        figs / "fit_vs_truth",
        color=cat.snr,
        color_label="S/N",
    )
    mdn_mean, mdn_sd = _mdn_columns(res, params)
    plots.coverage_plot(
        truth,
        mdn_mean,
        mdn_sd,
        params,
        figs / "mdn_coverage",
        title="MDN Gaussians vs truth (demo catalog)",
    )
    plots.coverage_plot(
        truth,
        got,
        got_err,
        params,
        figs / "fit_coverage",
        title="fit errors vs truth (demo catalog)",
    )
    if mdn_model.history:
        plots.loss_curves(
            mdn_model.history, figs / "mdn_training_loss", title="default MDN"
        )
    best = int(np.argmin(np.abs(np.asarray(res["chi2_red"]) - 1.0)))
    plots.spectrum_with_model(
        emu.wavelength,
        cat.noisy[best],
        fits.model_fit[best],
        figs / "spectrum_fit_example",
        err=cat.err[best],
        mask=~ok[best],
        title=_label_text(emu, got[best, :-1])
        + f", rv={got[best, -1]:.2f} km/s"
        + f"  (fit of catalog row {best})",
        data_label="simulated observation",
        model_label="best fit",
    )


def _mdn_columns(res, params) -> tuple[np.ndarray, np.ndarray]:
    """(n_spec, len(params)) MDN means and sigmas of a fit made with an MDN."""
    mdn_mean = np.column_stack([np.asarray(res[f"{n}_mdn"], float) for n in params])
    mdn_sd = np.column_stack([np.asarray(res[f"{n}_mdn_sigma"], float) for n in params])
    return mdn_mean, mdn_sd


def _emcee_stars(
    cat, emu, mdn_model, outdir: Path, truth, got, *, n_emcee, seed, progress
):
    """emcee on the first ``n_emcee`` stars (walkers from the LM fits): posterior
    summaries in ``outdir/posterior_emcee.ecsv`` and a corner plot of the first,
    with the truth and the LM solution marked.

    Args:
        truth, got: (n_spec, L + 1) true labels and rv, and the LM fit's values.

    Returns:
        A namespace: ``rows`` the stars sampled, ``seconds`` the time taken,
        ``post`` the posterior table (None without stars), ``inside`` (stars, L + 1)
        bool, truth within the 16-84th percentiles (None without stars).
    """
    import warnings

    from . import plots
    from .errors import SamplingWarning
    from .options import EmceeOptions
    from .posterior import sample

    noisy, err, labels, rv = cat.noisy, cat.err, cat.labels, cat.rv
    params = [*emu.label_names, "rv"]
    rows_e = np.arange(min(n_emcee, len(noisy)))
    out = SimpleNamespace(rows=rows_e, seconds=0.0, post=None, inside=None)
    if not rows_e.size:
        return out
    t = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplingWarning)
        post, chains = sample(
            noisy[rows_e], err[rows_e], emu, method="emcee", mdn=mdn_model,
            options=EmceeOptions(n_steps=EMCEE_MAX_STEPS), seed=seed,
            return_samples=True, progress=progress,
        )  # fmt: skip
    out.seconds = time.perf_counter() - t
    post["id"] = rows_e
    post.write(outdir / "posterior_emcee.ecsv", overwrite=True)
    k = [params.index(n) for n in chains.names]
    plots.corner_plot(
        chains.samples[0], chains.names, outdir / "figures" / "corner_emcee_row0",
        units=chains.units, truths=truth[0, k], best=got[0, k],
        title=f"emcee posterior, catalog row 0 ({_label_text(emu, labels[0])}, "
        f"rv={rv[0]:.1f} km/s)",
    )  # fmt: skip
    e16 = np.column_stack([np.asarray(post[f"{n}_p16"], float) for n in params])
    e84 = np.column_stack([np.asarray(post[f"{n}_p84"], float) for n in params])
    out.post = post
    out.inside = (truth[rows_e] >= e16) & (truth[rows_e] <= e84)
    return out


def _summary(cat, fits, emcee, emu, truth, got, got_err, *, t_load, t0, outdir):
    """The numbers :func:`run_demo` returns (see there), from the namespaces of
    :func:`_simulate_catalog`, :func:`_fit_catalog` and :func:`_emcee_stars`."""
    res, res_plain = fits.res, fits.res_plain
    n_spec = len(cat.labels)
    params = [*emu.label_names, "rv"]
    d = got - truth
    q16, q50, q84 = np.nanpercentile(d, [16, 50, 84], axis=0)
    within = np.abs(d) < got_err
    # the same split by the emulator's own error on each star (its RMS against the
    # synthesizer): the emulator term of the errors is one covariance over the box,
    # scaled per label by the emulator's error_scale at the fitted labels
    worse = cat.table["emu_rms_err"] >= np.median(cat.table["emu_rms_err"])
    mdn_mean, mdn_sd = _mdn_columns(res, params)
    mdn_z = np.abs(mdn_mean - truth) / mdn_sd
    got_plain = np.column_stack([np.asarray(res_plain[n], float) for n in params])
    p16, p84 = np.nanpercentile(got_plain - truth, [16, 84], axis=0)
    pixel_mae = np.median(np.abs(cat.resid), axis=0)
    rows_e, post = emcee.rows, emcee.post
    summary = dict(
        n_spec=n_spec,
        n_pix=emu.n_pix,
        median_abs_error=float(np.median(pixel_mae)),
        p99_pixel_error=float(np.percentile(pixel_mae, 99)),
        emulator_spectra_per_s=n_spec / cat.t_emu,
        synth_spectra_per_s=n_spec / cat.t_synth,
        fit_spectra_per_s=n_spec / fits.t_fit,
        fit_first_call_seconds=fits.t_fit_first,
        fit_labels=params,
        fit_scatter=[float(x) for x in (q84 - q16) / 2],
        fit_bias=[float(x) for x in q50],
        fit_within_1sigma=[float(x) for x in np.mean(within, axis=0)],
        fit_within_1sigma_emu_better=[float(x) for x in np.mean(within[~worse], 0)],
        fit_within_1sigma_emu_worse=[float(x) for x in np.mean(within[worse], 0)],
        fit_flagged=int(np.count_nonzero(np.asarray(res["flags"]))),
        # what the fit's errors include (the printed note says it): the emulator's
        # per-pixel error in the weights, its error basis in the covariance
        fit_emulator_error=bool(res.meta.get("emulator_error_in_likelihood")),
        fit_emulator_error_correlated=bool(res.meta.get("emulator_error_correlated")),
        fit_emulator_error_scaled=bool(res.meta.get("emulator_error_scaled")),
        emulator_error_rank=(
            0 if emu.error_basis is None else int(np.shape(emu.error_basis)[0])
        ),
        fit_median_iter=float(np.median(res["n_iter"])),
        mdn_refit=int(np.count_nonzero(np.asarray(res["mdn_refit"]))),
        mdn_seconds=float(res.meta["mdn_seconds"]),
        mdn_within_1sigma=[float(x) for x in np.mean(mdn_z < 1, axis=0)],
        mdn_within_3sigma=[float(x) for x in np.mean(mdn_z < 3, axis=0)],
        plain_spectra_per_s=n_spec / fits.t_plain,
        plain_median_iter=float(np.median(res_plain["n_iter"])),
        plain_scatter=[float(x) for x in (p84 - p16) / 2],
        load_seconds=t_load,
        total_seconds=time.perf_counter() - t0,
        emcee_stars=int(rows_e.size),
        emcee_seconds_per_star=emcee.seconds / max(rows_e.size, 1),
        emcee_converged=int(np.count_nonzero(post["converged"])) if rows_e.size else 0,
        emcee_truth_in_68=float(np.mean(emcee.inside)) if rows_e.size else float("nan"),
        outdir=str(outdir),
    )
    return summary


def _shift_all(doppler_shift, wave, flux, rv):
    import jax

    shift = jax.jit(jax.vmap(doppler_shift, in_axes=(None, 0, 0, None)))
    return shift(wave, flux, rv, wave)


def _label_text(emu: Emulator, x) -> str:
    return ", ".join(
        f"{n}={v:.4g}{(' ' + u) if u else ''}"
        for n, u, v in zip(emu.label_names, emu.label_units, x, strict=True)
    )
