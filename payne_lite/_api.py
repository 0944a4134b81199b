"""The public :func:`fit`: one entry point for point fits and posteriors.

It hands ``method="lm"`` / ``"curve_fit"`` to :func:`payne_lite.fitting.fit_spectra`
and the samplers to :func:`payne_lite.posterior.sample`, with the same model
(emulator, instrument, continuum, rv range, fixed parameters) and the method's own
options object. The point fits know nothing of the samplers: the samplers build on
the point fits (their LM start), and this module sits above both.
"""

from __future__ import annotations

import numpy as np

from .emulator import Emulator
from .fitting import METHODS as POINT_METHODS
from .fitting import fit_spectra
from .observe import ContinuumPixels, Instrument
from .options import options_for
from .posterior import METHODS as SAMPLERS
from .posterior import sample
from .spectra import unpack

__all__ = ["METHODS", "fit"]

#: Every ``fit(method=...)``.
METHODS = (*POINT_METHODS, *SAMPLERS)


def fit(
    flux,
    flux_err=None,
    emulator: Emulator | None = None,
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
    options=None,
):
    """Fit labels, radial velocity and (optionally) a continuum to observed spectra.

    Args:
        flux: (n, P) or (P,) observed flux on ``wavelength``; or a
            ``specutils.Spectrum`` (one, or several on one spectral axis), a list of
            them (any grids) or a ``SpectrumCollection``: wavelength (with its unit,
            air or vacuum), flux, uncertainty and mask are taken from it
            (:mod:`payne_lite.spectra` says how; ``flux_err`` and ``wavelength``
            are then None, and ``pl.fit(spectrum, emulator=emu)`` or
            ``pl.fit(spectrum, emu)`` both work). The table's ``meta["input"]`` says
            what was read; :func:`payne_lite.spectra.model_spectrum` turns
            ``return_model``'s column into spectra.
        flux_err: same shape, 1-sigma errors; non-finite or non-positive errors (and
            non-finite flux) give that pixel zero weight.
        emulator: the rest-frame spectrum emulator (required).
        mask: optional bool (P,) or (n, P), True = ignore the pixel.
        wavelength: observed wavelength [A]: (P,) one grid for all spectra, or
            (n, P) one grid per spectrum; NaN entries are masked pixels (e.g. the
            padding of a ragged catalog); None = the emulator's grid. Spectra on
            identical grids are fitted together, and grids of one shape share the
            compiled solver (except grids made of the emulator's own log-uniform
            pixels, whose layout is static: one compilation per such layout). The
            model is computed on the emulator's grid and linearly interpolated at
            each observed wavelength (see :mod:`payne_lite.observe`).
        method: ``"lm"`` (batched Levenberg-Marquardt in JAX, the default) or
            ``"curve_fit"`` (scipy, trf, JAX Jacobian) for point fits;
            ``"emcee"``, ``"nuts"``, ``"mdn-is"`` or ``"flow-is"`` return posterior summaries from
            :func:`payne_lite.sample` (box prior; call it directly for priors and
            its other arguments). ``p0``, ``group`` and ``return_model`` are
            point-fit arguments and refused with a sampler.
        instrument: the observation side (:class:`payne_lite.Instrument`: air
            wavelengths, instrumental resolution, rotation and macroturbulence
            kernels); None = vacuum, the emulator's resolution, no broadening. A
            per-star (n, P) resolution needs per-star grids.
        cont_deg: degree of the multiplicative Chebyshev continuum (0 = none).
        rv_range: (lo, hi) [km/s] searched by the RV scan and bounding the fit.
        p0: optional starting labels [physical], (L,) or (n, L); replaces the Teff
            starts. A 1-D ``p0`` is also the RV-scan template (else the box centre).
        fixed: ``{name: value}`` holds labels [physical] or ``"rv"`` [km/s] fixed.
        seed: seeds the random starts of ``options.mdn_starts`` (the default starts
            are a fixed Teff grid).
        return_model: add a ``model_flux`` (n, P) column with the best-fit spectra
            (NaN at pixels where the model is undefined: shifted off the
            emulator's grid; the fit does not use them).
        emulator_error: add the emulator's own per-pixel error (``pixel_error``,
            measured on held-out spectra when it was trained; shifted to each
            star's RV from the scan) in quadrature to the flux errors, when the
            emulator has one (emulators imported from The Payne have none). With
            an ``error_basis`` too (emulators trained by payne_lite), the errors
            are also treated as correlated across pixels, as they are (an
            emulator's error at one label vector is a smooth pattern that moves
            the labels coherently): the covariance becomes the sandwich
            ``A^-1 (J^T W D W J + J^T W C_emu W J) A^-1`` (``A = J^T W J`` with the
            fit's weights W, D the data variances, ``C_emu = B^T B`` from the
            basis shifted to the star's rv; for ``group=`` fits the visits share
            one emulator error): the scatter of this weighted fit under that
            error. :func:`payne_lite.sample` samples the posterior under the same
            error model ``C = diag(D) + U^T U``
            (:mod:`payne_lite.observe._noise`), whose width is about
            ``(J^T C^-1 J)^-1``, the generalised least-squares one: narrower than
            the sandwich where ``U^T U`` dominates ``D`` (high S/N), about equal
            where it does not. ``meta["emulator_error_correlated"]`` says
            whether it was used. Per-pixel quadrature alone leaves the errors too
            small at high S/N (``benchmarks/bench_emulator_error.py``).
        progress: show a tqdm progress bar over spectra.
        mdn: a :class:`payne_lite.MDN` trained for ``emulator``: its means start and
            its +- 3 sigma intervals bound each fit, with a fallback to the default
            path (see the module docstring). Not together with ``p0``; the spectra
            must be on the MDN's (the emulator's) wavelength grid.
        options: the method's settings, one object per method
            (:mod:`payne_lite.options`): :class:`payne_lite.LMOptions` (iterations,
            batching, threads, MDN starts, ``continuum="profile"``, error scaling),
            :class:`payne_lite.CurveFitOptions`, :class:`payne_lite.EmceeOptions`,
            :class:`payne_lite.NUTSOptions` or :class:`payne_lite.ISOptions`; None =
            the method's defaults. Another method's options are refused.
            ``LMOptions(continuum="profile")`` (variable projection) gives the
            same best fit and errors as ``"fit"``: ``J_perp^T J_perp`` is the Schur
            complement of the continuum block of ``J^T W J``, so its inverse is the
            labels' and rv's marginal covariance with the continuum's uncertainty
            included; the table reports the full covariance at the best fit
            (continuum coefficients included).
        group: (n,) star identifier of each spectrum (any values ``numpy.unique``
            can sort): spectra with the same identifier are visits of one star,
            fitted jointly with shared labels (and ``vsini`` / ``vmacro``: the
            star's), one rv (and continuum) per visit; the instrument's profile
            applies to every visit. The table then has one row per star (see
            Returns). With ``method="lm"`` or ``"curve_fit"``; with per-spectrum
            grids (n, P) all visits of a star must be on one grid; with an ``mdn``
            its labels of each star's highest-S/N visit are one more start
            (screened with the others; the fit is bounded by the box, not by the
            MDN). Not with ``p0`` of shape (n, L) or a fixed rv; batches of stars
            run one after the other (``n_threads`` is not used) and ``progress``
            shows no bar.

    Returns:
        astropy Table, one row per spectrum: ``<label>``, ``<label>_err`` [label
        units], ``rv``, ``rv_err`` [km/s], ``cont_<k>``, ``cont_<k>_err`` (if
        ``cont_deg > 0``), ``chi2``, ``chi2_red``, ``n_good_pixels``, ``n_iter``,
        ``converged``, ``flags`` (bitmask, see the module docstring) and
        ``covariance`` (n, k, k) in physical units over ``meta["cov_params"]``,
        ``snr`` (median S/N of the used pixels). Errors are not rescaled by
        ``chi2_red`` unless ``options.scale_errors``. With an MDN also
        ``<label>_mdn``,
        ``<label>_mdn_sigma``, ``rv_mdn``, ``rv_mdn_sigma`` and ``mdn_refit``, and
        ``meta["mdn_seconds"]``. ``meta["instrument"]`` records the instrument
        (:meth:`payne_lite.Instrument.to_meta`).

        With ``group``: one row per star, in the order of first appearance, with
        ``group`` (the identifier), ``n_visits``, ``visit_rows`` (n_star, V) int
        (rows of ``flux`` in each star's visit order, -1 for padding), ``rv`` and
        ``rv_err`` (n_star, V) [km/s] (visit v of star i in ``rv[i, v]``, NaN after
        a star's last visit; V = the most visits of any star), ``cont_<k>``,
        ``cont_<k>_err`` (n_star, V) likewise, ``chi2_visit``,
        ``n_good_pixels_visit``, ``snr_visit``, ``max_dip`` (n_star, V; bit 9 when
        any visit reaches its limit), ``snr`` the combined
        S/N ``sqrt(sum snr_visit^2)``, and ``chi2``, ``chi2_red``, ``chi2_pvalue``,
        ``n_good_pixels`` over all visits; ``covariance`` is over
        ``meta["cov_params"]`` (labels, ``rv_1`` .. ``rv_V``, ``cont_<k>_<v>``,
        broadening), NaN for padding; ``vsini``, ``vsini_err`` (``vmacro``) one
        per star when modelled; with per-spectrum grids ``grid_group``; with an
        MDN ``<label>_mdn``, ``<label>_mdn_sigma`` (of the visit ``mdn_visit``
        that started the fit), ``rv_mdn``, ``rv_mdn_sigma`` (n_star, V). Bit 1
        (at a bound) looks at every visit's rv. :func:`payne_lite.fitting.pad_visits`
        pads such a table to more visits (to stack tables).

    Raises:
        ValueError: shapes that do not fit together (named in the message), an unknown
            method or fixed parameter, a bad ``rv_range``, ``p0`` outside the box,
            ``p0`` with ``mdn``, an MDN trained for another emulator or grid,
            another method's options, a combination that is not supported (named).

    Examples:
        >>> import payne_lite as pl
        >>> t = pl.fit(flux, err, emu, wavelength=wave,  # doctest: +SKIP
        ...            instrument=pl.Instrument(resolution=8000.0, vsini=True),
        ...            cont_deg=1, options=pl.LMOptions(max_iter=60))
    """
    flux, flux_err, emulator, mask, wavelength, instrument, read = unpack(
        flux, flux_err, emulator, mask=mask, wavelength=wavelength,
        instrument=instrument, cont_deg=cont_deg,
    )  # fmt: skip
    if method in SAMPLERS:
        given = [
            name for name, value in (("p0", p0), ("group", group)) if value is not None
        ] + (["return_model"] if return_model else [])
        if given:
            raise ValueError(
                f"method={method!r}: {', '.join(given)} "
                f"{'is a point-fit argument' if len(given) == 1 else 'are point-fit arguments'}"
                " (lm, curve_fit); the samplers start from their own LM fit"
            )
        table = sample(
            flux, flux_err, emulator, method=method, mask=mask, wavelength=wavelength,
            instrument=instrument, mdn=mdn, cont_deg=cont_deg, rv_range=rv_range,
            fixed=fixed, seed=seed, emulator_error=emulator_error, progress=progress,
            options=options,
        )  # fmt: skip
    elif method not in POINT_METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    else:
        kw = dict(
            emulator=emulator, mask=mask, wavelength=wavelength, method=method,
            instrument=instrument, cont_deg=cont_deg, rv_range=rv_range, p0=p0,
            fixed=fixed, mdn=mdn, group=group, seed=seed,
            emulator_error=emulator_error, progress=progress, options=options,
        )  # fmt: skip
        opts = options_for(method, options)
        refine_continuum = opts.refine_continuum
        table = fit_spectra(
            flux, flux_err, return_model=return_model or refine_continuum > 0, **kw
        )
        for k in range(int(refine_continuum)):
            wave = emulator.wavelength if wavelength is None else wavelength
            flux, flux_err = _refined(
                flux, flux_err, mask, wave, table, opts.refine_deg
            )
            table = fit_spectra(
                flux, flux_err, return_model=return_model or k < refine_continuum - 1,
                **kw,
            )  # fmt: skip
        if refine_continuum:
            if not return_model and "model_flux" in table.colnames:
                table.remove_column("model_flux")
            table.meta["continuum_refined"] = {
                "passes": int(refine_continuum),
                "deg": opts.refine_deg,
            }
    if read is not None:
        table.meta["input"] = read
    return table


def _refined(flux, flux_err, mask, wave, table, deg: int):
    """``(flux / c, err')`` with ``c`` (n, P) per chip a degree-``deg``
    polynomial fitted to flux / model (``table["model_flux"]``, rows by
    ``visit_rows`` for joint fits) over the good pixels, and the errors propagated
    as by :class:`payne_lite.ContinuumPixels`."""
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    err = np.atleast_2d(np.asarray(flux_err, np.float64))
    mf = np.asarray(table["model_flux"], np.float64)
    if "visit_rows" in table.colnames:  # (n_star, V, P) -> (n, P)
        vr = np.asarray(table["visit_rows"])
        model = np.full(flux.shape, np.nan)
        ok = vr >= 0
        model[vr[ok]] = mf[ok]
    else:
        model = mf.reshape(flux.shape)
    bad = ~(model > 0) | ~np.isfinite(flux) | ~(err > 0)
    if mask is not None:
        bad = bad | np.asarray(mask, bool)
    with np.errstate(all="ignore"):
        ratio_f = np.where(bad, 1.0, flux / model)
        ratio_e = np.where(bad, 1.0, err / model)
    w = np.asarray(wave, np.float64)
    every = ContinuumPixels(wavelength=np.unique(w[np.isfinite(w)]), deg=deg)
    out = every(w, ratio_f, ratio_e, bad)
    c = np.where(np.isfinite(out.continuum) & (out.continuum > 0), out.continuum, 1.0)
    with np.errstate(all="ignore"):
        new_err = np.where(out.mask, err / c, out.flux_err * model)
    return flux / c, new_err
