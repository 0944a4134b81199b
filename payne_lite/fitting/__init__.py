"""Fit observed spectra with an emulator: labels, radial velocity, continuum.

``fit(flux, flux_err, emulator, ...) -> astropy.table.Table``, one row per spectrum.

Steps, for a batch of spectra (the model is in :mod:`payne_lite.observe`):

1. Validation at the NumPy boundary: shapes are checked (``ValueError`` naming them);
   masked pixels and pixels with non-finite flux or non-finite / non-positive errors
   get zero weight (``ivar = 0``); inputs are never modified.
2. RV scan: chi2 on a grid of radial velocities over ``rv_range``
   (``RV_SCAN_STEP`` = 4 km/s, about an APOGEE pixel) against the box-centre model,
   over the pixels valid at every RV of the scan (or per valid pixel when those are
   too few), refined to the vertex of the parabola through the lowest chi2 and its
   two neighbours; the continuum, if any, is solved linearly at each RV. The RV
   chi2 basin is only a few km/s wide, so the local fit must start inside it
   (measured on 400 spectra of the APOGEE network at S/N 100 and 30: the same LM
   steps per star, 3.9 and 4.8, from scans at 2, 4 and 6 km/s).
3. Local fit inside ``rv_scan +- RV_WINDOW`` and the training box, from several
   starting points per star (Teff at ``TEFF_STARTS`` of the box, other labels at the
   box centre, the scan's RV and continuum); the best chi2 is kept. Only pixels valid
   over the whole RV window are used, so the pixel set does not change during a fit.
   ``method="lm"``: batched Levenberg-Marquardt in JAX (:func:`._lm._lm_lanes`), one
   compilation per batch shape; the starts are ranked by their chi2, the best is
   fitted, and the others too when that fit is doubtful (not converged, at an edge
   of the box, or chi2 beyond noise: :func:`._driver.lm_with_starts`); best chi2 kept;
   ``method="curve_fit"``: ``scipy.optimize.curve_fit``
   (``method="trf"``) per star with the JAX Jacobian, same model, bounds and starts.
   The emulator's own per-pixel error, when it has one, is added in quadrature to
   the flux errors (``emulator_error=True``, the default;
   :func:`payne_lite.observe.emulator_error_on`); with an ``error_basis`` too, step 4
   treats it as correlated across pixels.
4. Errors from the covariance ``(J^T W J)^-1`` at the best fit, transformed from
   scaled to physical label units; with the emulator's ``error_basis`` B and
   ``emulator_error=True``, the sandwich ``A^-1 (J^T W D W J + J^T W B_s^T B_s W J)
   A^-1`` (``A = J^T W J``, D the data variances, ``B_s`` the basis shifted to the
   star's rv: :func:`._lm.sandwich_meat`): the scatter of the fit's own estimator,
   least squares with the per-pixel weights ``W``, when the residuals have the
   covariance ``D + B_s^T B_s`` (the low-rank part ``U^T U`` of the samplers' error
   model :mod:`payne_lite.observe._noise`; the meat leaves out the per-pixel
   emulator variance that ``U`` does not hold, which only the weights carry). With
   the emulator's ``error_scale`` (:func:`payne_lite.calibrate_emulator_errors`)
   the emulator part of each label's and rv's error is multiplied by ``kappa``
   at the fitted labels (:func:`._schema.error_scale_vector`): the one covariance
   ``B^T B`` over the box misjudges how the error moves the labels by a factor
   that depends on where in the box the star is. The samplers
   (:func:`payne_lite.sample`) sample the posterior under the full ``C =
   diag(D) + U^T U`` instead (without the scale), whose width is about ``(J^T C^-1 J)^-1``: the
   variance of the generalised least-squares estimator, which the LM does not
   compute. The two agree where ``U^T U`` is small next to ``D`` (low S/N); where
   it dominates (high S/N) the posterior is narrower than the sandwich, as GLS
   down-weights the correlated error that the per-pixel weights cannot
   (``benchmarks/bench_error_model.py``; replacing the sandwich by
   ``(J^T C^-1 J)^-1`` around the weighted fit's best values halved the coverage
   at S/N 300). By default not rescaled (the errors are then
   right when the flux errors are right and the model fits: their coverage is
   checked in ``benchmarks/bench_fit.py``); ``scale_errors=True`` multiplies the
   covariance by the reduced chi2 when it is above 1 (never shrinks it), the usual
   remedy when flux errors are underestimated or the model does not fit.

Several visits of one star (``group=``): each spectrum gets steps 1-2 alone; then
the visits of a star are fitted together (step 3) with the parameter vector
``[s (L), rv_1 .. rv_V, c_1 .. c_V, b]`` (:func:`visit_index`; ``b`` the broadening,
vsini and vmacro, a property of the star shared by its visits): the normal equations
are the sums of the visits' own (:func:`._lm._lane_normal`), so the single-spectrum
kernels are reused (with ``method="curve_fit"``, scipy's trf on the visits' stacked
residuals, :func:`._curve_fit.curve_fit_joint`); stars with fewer than V visits carry
padding visits of zero weight. The instrument's profile and broadening are those of
every single-spectrum fit; per-spectrum grids are fitted grid by grid, each star's
visits on one grid, and the star tables padded to one V (:func:`pad_visits`). With
an MDN, its labels of a star's highest-S/N visit are one more start (screened with
the Teff starts; the fit is bounded by the box). One row per star (see
:func:`payne_lite.fit`).

Profiled continuum (``continuum="profile"``): the Chebyshev coefficients are solved
by weighted linear least squares at every LM step and the step is taken in labels and
rv with the Schur complement ``J_perp^T J_perp`` (:func:`._lm._profiled_normal`); same
minimum and covariance as fitting them (``continuum="fit"``).

QA bitmask (column ``flags``): the table is in :mod:`payne_lite.fitting._schema`
(``FLAG_BITS``, :func:`poor_fit`).

With an MDN (``fit(..., mdn=mdn)``, :mod:`payne_lite.mdn`), as LUCI does: the MDN's
means (clipped into the box) are the one start per star, and its mean +-
``MDN_NSIGMA`` (3) sigma, intersected with the training box and ``rv_range``, bound
the labels and rv; there is no RV scan (the MDN locates the RV by cross-correlation
and gives its error, so the window is its own +-3 sigma instead of the scan's +-
``RV_WINDOW``; the scan remains the fallback). A star whose fit ends at an MDN bound
that is not the box's edge, or is NaN, or for which the MDN has no answer, is
refitted by the default path (RV scan, Teff starts, whole box) and the lower chi2
kept; ``mdn_refit`` marks them and their ``n_iter`` counts both passes. Columns
``<label>_mdn``, ``<label>_mdn_sigma``, ``rv_mdn``, ``rv_mdn_sigma`` hold the MDN's
Gaussians.

Real instruments (``resolution=``, ``lsf_sigma=``, ``vsini=``, ``vmacro=``, ``air=``,
per-star ``wavelength`` (n, P)): the model is :func:`payne_lite.observe.observe` with
the rest-frame broadening of :func:`payne_lite.observe.rest_model`; the RV-scan
template is broadened at the start values (``BROADENING_START``, or the fixed
ones); the Jacobian is ``jax.jacfwd`` of the model (the fast normal equations apply
to the unbroadened model only). Broadening parameters come after the continuum's in
the parameter vector and in ``meta["cov_params"]``; their columns are in km/s.
Spectra with per-star grids are grouped by grid and fitted group by group
(:func:`._grids.fit_per_star_grids`).

Precision: JAX's default float (float32 unless x64 is enabled); the covariance is
inverted on the host in float64.

References:
    Ting, Conroy, Rix & Cargile 2019, ApJ 879, 69 ("The Payne").
"""

from __future__ import annotations

from ._companion import Companion as Companion
from ._companion import companion_search as companion_search
from ._fit import METHODS as METHODS
from ._fit import fit_spectra as fit_spectra
from ._lm import visit_index as visit_index
from ._ppc import PixelResiduals as PixelResiduals
from ._ppc import pixel_residuals as pixel_residuals
from ._schema import FLAG_BITS as FLAG_BITS
from ._schema import FLAG_COMPANION as FLAG_COMPANION
from ._schema import FLAG_EMULATOR_POOR as FLAG_EMULATOR_POOR
from ._schema import FLAG_FAILED as FLAG_FAILED
from ._schema import FLAG_LOCAL_MISFIT as FLAG_LOCAL_MISFIT
from ._schema import FLAG_NOT_CONVERGED as FLAG_NOT_CONVERGED
from ._schema import FLAG_POOR_FIT as FLAG_POOR_FIT
from ._schema import FLAGS_DESCRIPTION as FLAGS_DESCRIPTION
from ._schema import REFERENCE_PAYNE as REFERENCE_PAYNE
from ._schema import RESULT_KINDS as RESULT_KINDS
from ._schema import SCHEMA_COLUMNS as SCHEMA_COLUMNS
from ._schema import SCHEMA_META as SCHEMA_META
from ._schema import check_results_schema as check_results_schema
from ._schema import param_units as param_units
from ._schema import poor_fit as poor_fit
from ._schema import schema_meta as schema_meta
from ._visits import pad_visits as pad_visits
from ._visits import per_visit as per_visit

__all__ = [
    "PixelResiduals",
    "Companion",
    "companion_search",
    "pixel_residuals",
    "FLAGS_DESCRIPTION",
    "FLAG_BITS",
    "FLAG_EMULATOR_POOR",
    "FLAG_FAILED",
    "FLAG_NOT_CONVERGED",
    "FLAG_LOCAL_MISFIT",
    "FLAG_COMPANION",
    "FLAG_POOR_FIT",
    "METHODS",
    "REFERENCE_PAYNE",
    "RESULT_KINDS",
    "SCHEMA_COLUMNS",
    "SCHEMA_META",
    "check_results_schema",
    "fit_spectra",
    "pad_visits",
    "per_visit",
    "param_units",
    "poor_fit",
    "schema_meta",
    "visit_index",
]
