"""``fit_spectra``: the point-fit path of :func:`payne_lite.fit`."""

from __future__ import annotations

import dataclasses
import time

import jax.numpy as jnp
import numpy as np

from .._serial import default_threads
from .._validate import as_float_array, warn_if_near_grid
from ..emulator import Emulator
from ..observe import (
    BROADENING_START,
    Instrument,
    as_continuum,
    cached_obs_model,
    check_fixed,
    check_inputs,
    check_rv_range,
    fill_grid,
    lsf_sigma_pixels,
    param_layout,
    teff_index,
)
from ..options import CurveFitOptions, LMOptions, options_for
from ._driver import BatchContext, rescan_fits, run_batches, scatter_rows, take_rows
from ._gls import warn_small_basis
from ._grids import fit_per_star_grids
from ._mdn_bounds import add_mdn_columns, at_mdn_bound, mdn_prior, mdn_start_points
from ._rvscan import RV_SCAN_STEP, scan_pixels
from ._schema import results_table
from ._visits import check_group, fit_groups

#: Scaled-Teff starting points of the local fit (other labels start at the centre).
TEFF_STARTS = (-0.3, 0.0, 0.3)

METHODS = ("lm", "curve_fit")
#: ``fit(continuum=...)``: Chebyshev coefficients as LM parameters, or profiled out.
CONTINUUM_MODES = ("fit", "profile")
#: Posterior samplers ``fit`` hands to :func:`payne_lite.posterior.sample`.
SAMPLERS = ("emcee", "mdn-is", "flow-is", "nuts")


def fit_spectra(
    flux,
    flux_err,
    emulator: Emulator,
    *,
    mask=None,
    wavelength=None,
    method: str = "lm",
    instrument: Instrument | None = None,
    cont_deg: int = 0,
    rv_range=(-500.0, 500.0),
    p0=None,
    fixed=None,
    mdn=None,
    group=None,
    seed: int = 0,
    emulator_error: bool = True,
    return_model: bool = False,
    progress: bool = False,
    options: LMOptions | CurveFitOptions | None = None,
):
    """The point-fit path of :func:`payne_lite.fit` (``method="lm"`` or
    ``"curve_fit"``): arguments, returns and errors as documented there."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    opts = options_for(method, options)
    if group is not None:
        _check_group_args(group, flux, fixed, p0, emulator)
    inst, broadening, continuum = _instrument_as_fitted(
        instrument, opts, cont_deg, fixed, emulator, wavelength
    )
    wavelength = inst.vacuum_wavelength(wavelength)
    if wavelength is not None and np.ndim(wavelength) == 1:
        wavelength, mask = _fill_wavelength(wavelength, mask, mdn, emulator)
    if wavelength is not None and np.ndim(wavelength) == 2:
        # the wavelengths are vacuum now: the per-grid fits must not convert again
        t = fit_per_star_grids(
            fit_spectra, flux, flux_err, emulator, wavelength, mask=mask, p0=p0,
            instrument=dataclasses.replace(inst, air=False),
            settings=dict(
                method=method, cont_deg=cont_deg, rv_range=rv_range, fixed=fixed,
                mdn=mdn, seed=seed, emulator_error=emulator_error,
                return_model=return_model, progress=progress, options=opts,
            ),
            group=group,
        )  # fmt: skip
        t.meta["instrument"] = inst.to_meta(wavelength)
        t.meta["wavelength_air"] = inst.air
        return t
    rv_range = check_rv_range(rv_range)
    max_iter, batch_size = opts.max_iter, opts.batch_size
    n_threads, mdn_starts = opts.n_threads, opts.mdn_starts
    scale_errors = opts.scale_errors
    if mdn_starts and mdn is None:
        raise ValueError(f"{type(opts).__name__}(mdn_starts={mdn_starts}) needs an mdn")
    if mdn is not None:
        if p0 is not None:
            raise ValueError("pass p0 or mdn, not both (the MDN sets the starts)")
        mdn.check_emulator(emulator)
        if wavelength is not None:
            mdn.check_wavelength(wavelength)
    layout = param_layout(
        emulator, cont_deg=cont_deg, rv_range=rv_range, broadening=broadening
    )
    obs, derived = cached_obs_model(
        emulator,
        wavelength=wavelength,
        cont_deg=cont_deg,
        rv_max=max(abs(v) for v in rv_range),
        **inst.model_options(fixed, emulator),
    )
    n_pix = obs.x_obs.shape[0]
    flux2, ivar = check_inputs(flux, flux_err, mask, n_pix)
    n = flux2.shape[0]
    k = len(layout.names)
    fix = check_fixed(fixed, emulator, rv_range, layout)
    free = np.ones(k, bool)
    for j in fix:
        free[j] = False
    starts, s_scan = _starting_labels(emulator, p0, n, fix)

    wave_vac = np.asarray(
        emulator.wavelength if wavelength is None else wavelength, np.float64
    )
    ctx = _batch_context(
        emulator, obs, derived, layout, fix, free, s_scan, broadening,
        method=method, rv_range=rv_range, wavelength=wavelength, max_iter=max_iter,
        return_model=return_model, emulator_error=emulator_error,
        continuum=continuum, estimator=opts.estimator,
    )  # fmt: skip
    if group is not None:
        t = fit_groups(
            ctx, emulator, flux2, ivar, starts[0], group, batch_size=batch_size,
            scale_errors=scale_errors, mdn=mdn, mdn_starts=mdn_starts, seed=seed,
        )  # fmt: skip
        return _finish_meta(
            t, ctx, emulator, inst, broadening, continuum, wave_vac, None, None
        )
    if n_threads is None:
        n_threads = default_threads() if method == "lm" else 1
    # Every batch has batch_size rows (the last padded with zero weight): one
    # compiled executable serves any number of spectra (padding lanes do not run).
    size = int(batch_size)
    res, mdn_out = _run_all(
        ctx, emulator, flux2, ivar, starts, size, n_threads,
        mdn=mdn, mdn_starts=mdn_starts, seed=seed, progress=progress,
    )  # fmt: skip
    # the MDN's windows are not the scan's: only fits in a scan window are rescanned
    scan_window = np.ones(n, bool) if mdn_out is None else mdn_out[-1]
    res, rescanned = rescan_fits(ctx, flux2, ivar, res, size, n_threads, scan_window)
    t = _point_table(ctx, emulator, res, scale_errors)
    t.meta["rv_rescanned"] = int(rescanned.sum())
    return _finish_meta(
        t, ctx, emulator, inst, broadening, continuum, wave_vac, mdn, mdn_out
    )


def _check_group_args(group, flux, fixed, p0, emulator):
    """The checks of :func:`fit_spectra` on ``group=`` (before any work): one star
    id per spectrum, no fixed rv, one ``p0`` label vector."""
    n = 1 if np.ndim(flux) == 1 else int(np.shape(flux)[0])
    check_group(group, n)
    if fixed and "rv" in dict(fixed):
        raise ValueError("group=: each visit has its own rv; rv cannot be fixed")
    if p0 is not None and np.ndim(p0) != 1:
        raise ValueError(
            f"group=: p0 must be one label vector ({emulator.n_labels},), got "
            f"{np.shape(p0)}"
        )


def _instrument_as_fitted(instrument, opts, cont_deg, fixed, emulator, wavelength):
    """The checks of :func:`fit_spectra` on the instrument and continuum settings;
    returns ``(inst, broadening, continuum)``: the instrument as fitted
    (a kernel that ``fixed`` switched on is recorded on), the broadening parameters
    fitted or fixed, and the continuum mode."""
    inst = Instrument() if instrument is None else instrument
    if not isinstance(inst, Instrument):
        raise ValueError(
            f"instrument must be a payne_lite.Instrument, got {type(inst).__name__}"
        )
    continuum = getattr(opts, "continuum", "fit")
    if continuum == "profile" and as_continuum(cont_deg) is None:
        raise ValueError(
            f"continuum='profile' needs a continuum to profile: cont_deg >= 1 or a "
            f"ChipPolynomial, got {cont_deg!r}"
        )
    broadening = inst.broadening(fixed, emulator)
    # the instrument as fitted: a kernel that ``fixed`` switched on is recorded on
    inst = dataclasses.replace(
        inst, vsini="vsini" in broadening, vmacro="vmacro" in broadening
    )
    if inst.per_star and not (wavelength is not None and np.ndim(wavelength) == 2):
        raise ValueError(
            "a per-star (n, P) resolution or lsf_sigma needs per-star wavelength "
            "grids (n, P)"
        )
    return inst, broadening, continuum


def _fill_wavelength(wavelength, mask, mdn, emulator):
    """One (vacuum) grid (P,) [A]: warned about when near the emulator's (without an
    MDN); NaN entries are filled and masked. Returns ``(wavelength, mask)``."""
    wave1 = as_float_array(wavelength, "wavelength", ndim=1)
    if mdn is None and np.all(np.isfinite(wave1)):  # an MDN refuses others
        warn_if_near_grid(wave1, emulator.wavelength)
    if not np.all(np.isfinite(wave1)):  # NaN entries: masked pixels
        wavelength, missing = fill_grid(wave1, 0)
        mask = missing if mask is None else np.asarray(mask) | missing
    return wavelength, mask


def _starting_labels(emulator, p0, n, fix):
    """Starting labels (scaled), one row per start: ``starts`` (n, S, L) (``p0``'s
    one start, or Teff at ``TEFF_STARTS``, the other labels at the box centre) and
    the RV scan's template labels ``s_scan`` (L,); fixed labels at their value."""
    n_lab = emulator.n_labels
    if p0 is not None:
        p0_arr = emulator.check_labels(p0, name="p0")
        if p0_arr.shape[0] not in (1, n):
            raise ValueError(f"p0 {np.shape(p0)} must be ({n_lab},) or ({n}, {n_lab})")
        starts = np.broadcast_to(emulator.scale(p0_arr), (n, n_lab))[:, None, :]
        s_scan = emulator.scale(p0_arr[0]) if p0_arr.shape[0] == 1 else np.zeros(n_lab)
    else:
        starts = np.zeros((len(TEFF_STARTS), n_lab))
        starts[:, teff_index(emulator.label_names)] = TEFF_STARTS
        starts = np.broadcast_to(starts, (n, *starts.shape))
        s_scan = np.zeros(n_lab)
    starts = np.array(starts, dtype=np.float64)
    for j, v in fix.items():
        if j < n_lab:
            starts[:, :, j] = v
            s_scan[j] = v
    return starts, s_scan


def _batch_context(
    emulator, obs, derived, layout, fix, free, s_scan, broadening, *, method, rv_range,
    wavelength, max_iter, return_model, emulator_error, continuum, estimator="wls",
):  # fmt: skip
    """The :class:`BatchContext` of one :func:`fit_spectra` call: RV-scan grid
    (``RV_SCAN_STEP``) and pixels, broadening start values, the emulator's error.
    ``derived``: the dict kept with ``obs`` (:func:`cached_obs_model`)."""
    dt = obs.x_obs.dtype
    local = emulator.local_error if emulator_error else None
    if estimator == "gls" and not (
        emulator_error and (emulator.error_basis is not None or local is not None)
    ):
        raise ValueError(
            "estimator='gls' needs the emulator's correlated error: an emulator with "
            "an error_basis (Emulator.with_error_basis) or a local_error "
            "(Emulator.with_local_error), and emulator_error=True"
        )
    if estimator == "gls":
        warn_small_basis(emulator)
    if ("scan", rv_range) not in derived:
        derived["scan", rv_range] = scan_pixels(obs, rv_range)
    n_steps = int(np.ceil((rv_range[1] - rv_range[0]) / RV_SCAN_STEP))
    return BatchContext(
        obs=obs,
        layout=layout,
        fix=fix,
        free=free,
        method=method,
        rv_range=rv_range,
        rv_grid=jnp.asarray(np.linspace(rv_range[0], rv_range[1], n_steps + 1), dt),
        scan_pixels=derived["scan", rv_range],
        s_scan=jnp.asarray(s_scan, dt),
        b_scan=jnp.asarray(
            [fix.get(layout.names.index(b), BROADENING_START[b]) for b in broadening],
            dt,
        ),
        max_iter=int(max_iter),
        return_model=bool(return_model),
        emulator_error=(
            (
                np.asarray(emulator.wavelength, np.float64),
                np.asarray(
                    emulator.wavelength if wavelength is None else wavelength,
                    np.float64,
                ),
                np.asarray(emulator.pixel_error, np.float64),
            )
            if emulator_error and emulator.pixel_error is not None
            else None
        ),
        profile=continuum == "profile",
        gls=estimator == "gls",
        local_error=(
            (emulator.local_error_rows(dt), local)
            if estimator == "gls" and local is not None
            else None
        ),
        error_basis=(
            jnp.asarray(emulator.error_basis, dt)
            if emulator_error and emulator.error_basis is not None
            else None
        ),
    )


def _run_all(
    ctx, emulator, flux2, ivar, starts, size, n_threads, *, mdn, mdn_starts, seed,
    progress,
):  # fmt: skip
    """Every spectrum in batches of ``size`` (with a progress bar if ``progress``);
    with an MDN, :func:`_fit_with_mdn`. Returns ``(res, mdn_out)``: the
    :class:`._driver.BatchFit` of :func:`run_batches` and, with an MDN, what
    :func:`_fit_with_mdn` returns with them (else None)."""
    n = flux2.shape[0]
    rows_all = np.arange(n)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="fit", unit="spectrum")
    mdn_out = None
    try:
        if mdn is None:
            res = run_batches(ctx, flux2, ivar, starts, rows_all, size, n_threads, bar)
        else:
            res, mdn_out = _fit_with_mdn(
                ctx, mdn, emulator, flux2, ivar, starts, size, n_threads,
                mdn_starts, seed,
            )  # fmt: skip
            if bar is not None:
                bar.update(n)
    finally:
        if bar is not None:
            bar.close()
    return res, mdn_out


def _fit_with_mdn(
    ctx, mdn, emulator, flux2, ivar, starts, size, n_threads, n_extra, seed
):
    """The MDN path: fits inside the MDN's bounds from its starts (``n_extra`` draws
    besides the mean); the stars that end at an MDN bound, are NaN or have no MDN
    answer are refitted by the default path (``starts``, whole box) and the lower
    chi2 kept. Returns ``(res, (refit, ok, mean, sigma, seconds, scan_window))``:
    the :class:`._driver.BatchFit` and the MDN's (n,) refit and answer flags, its
    Gaussians (n, L + 1), its run time [s], and (n,) whether the fit kept is the
    default path's (its rv window the scan's, not the MDN's)."""
    fix, free, layout, rv_range = ctx.fix, ctx.free, ctx.layout, ctx.rv_range
    rows_all = np.arange(flux2.shape[0])
    t0 = time.perf_counter()
    prior, mdn_ok, mdn_mean, mdn_sigma = mdn_prior(
        mdn, emulator, flux2, ivar, starts[:, 0], fix, rv_range
    )
    t_mdn = time.perf_counter() - t0
    res = run_batches(
        ctx,
        flux2,
        ivar,
        mdn_start_points(prior, int(n_extra), fix, seed),
        rows_all,
        size,
        n_threads,
        None,
        prior=prior,
    )
    refit = ~mdn_ok | at_mdn_bound(res.p, prior, free, layout, rv_range)
    refit |= ~np.all(np.isfinite(res.p), axis=1) | ~np.isfinite(res.chi2)
    rows = np.flatnonzero(refit)
    scan_window = np.zeros(flux2.shape[0], bool)
    if rows.size:
        res2 = run_batches(ctx, flux2, ivar, starts, rows, size, n_threads, None)
        first_it = res.n_iter[rows]
        better = (
            ~np.isfinite(res.chi2[rows]) | (res2.chi2 < res.chi2[rows]) | ~mdn_ok[rows]
        )
        scatter_rows(res, rows[better], take_rows(res2, better))
        res.n_iter[rows] = first_it + res2.n_iter  # the work done, both passes
        scan_window[rows[better]] = True
    return res, (refit, mdn_ok, mdn_mean, mdn_sigma, t_mdn, scan_window)


def _point_table(ctx, emulator, res, scale_errors):
    """:func:`results_table` of the :class:`._driver.BatchFit` ``res`` of one fit."""
    return results_table(
        emulator,
        ctx.layout,
        ctx.obs,
        ctx.free,
        res,
        method=ctx.method,
        rv_range=ctx.rv_range,
        scale_errors=scale_errors,
        emulator_error_used=ctx.emulator_error is not None,
    )


def _finish_meta(t, ctx, emulator, inst, broadening, continuum, wave_vac, mdn, mdn_out):
    """The table's instrument, broadening and continuum meta, and with an MDN its
    columns (:func:`add_mdn_columns`); returns ``t``."""
    obs = ctx.obs
    if obs.broad is not None:
        wave_obs = np.asarray(obs.wave_obs, np.float64)
        sig_pix, r_emu = lsf_sigma_pixels(
            emulator, wave_obs, resolution=inst.resolution,
            lsf_sigma=inst.lsf_sigma, emulator_resolution=inst.emulator_resolution,
        )  # fmt: skip
        t.meta.update(
            emulator_resolution=r_emu,
            lsf_sigma_pixels_max=None if sig_pix is None else float(np.max(sig_pix)),
            limb_darkening=inst.limb_darkening,
            broadening=list(broadening),
        )
    t.meta["instrument"] = inst.to_meta(wave_vac)
    t.meta["wavelength_air"] = inst.air
    if mdn is not None:
        refit, mdn_ok, mdn_mean, mdn_sigma, t_mdn, _ = mdn_out
        add_mdn_columns(t, ctx.layout, mdn_mean, mdn_sigma, refit, mdn_ok)
        t.meta.update(mdn_seconds=round(t_mdn, 4), mdn_n_components=mdn.n_components)
    t.meta["continuum"] = continuum
    # "gls": the estimate and covariance under the whole C (no sandwich to scale)
    t.meta["estimator"] = "gls" if ctx.gls else "wls"
    if ctx.gls:
        t.meta.update(
            emulator_error_correlated=True,
            emulator_error_scaled=False,
            emulator_error_local=ctx.local_error is not None,
        )
    return t
