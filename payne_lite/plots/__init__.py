"""payne_lite.plots: figures (matplotlib, Agg backend); each function writes
``<stem>.png`` and ``.pdf``.

==================================  ===================================================
function                            figure
==================================  ===================================================
:func:`fit_vs_truth`                fit minus truth against truth, one panel per label
:func:`spectrum_with_model`         a spectrum, its model and the residuals: the full
                                    range and zoomed wavelength windows
:func:`emulator_error_histogram`    emulator minus truth on held-out spectra
:func:`pixel_error_plot`            an emulator's stored per-pixel held-out error
:func:`loss_curves`                 training and validation loss (emulator or MDN)
:func:`validation_report_plot`      an emulator's held-out error across its label
                                    box, from its validation report
:func:`coverage_plot`               calibration: fraction of truths within z sigma
                                    against the Gaussian expectation erf(z / sqrt 2)
:func:`corner_plot`                 1-D and 2-D marginals of posterior samples
                                    (drawn by ``corner``)
:func:`trace_plot`                  MCMC traces per parameter and chain, with each
                                    chain's marginal beside them
:func:`prior_posterior_plot`        per parameter, the posterior over the prior on
                                    the prior's whole support, and zoomed
==================================  ===================================================

Every figure function returns the paths it wrote, ``[png, pdf]``. :func:`coverage`
gives the calibration numbers behind :func:`coverage_plot`; :func:`figures_from_files`
makes every figure a set of saved files allows (``payne-lite plot``).

Modules: ``_fits`` (fit minus truth, spectrum with model, calibration), ``_training``
(emulator error, loss curves), ``_validation`` (the validation report),
``_posterior`` (corner, trace, prior against
posterior), ``_files`` (figures from saved files), ``_style`` (helpers they share).
"""

from __future__ import annotations

from ._files import Figures as Figures
from ._files import figures_from_files as figures_from_files
from ._fits import coverage as coverage
from ._fits import coverage_plot as coverage_plot
from ._fits import fit_vs_truth as fit_vs_truth
from ._fits import spectrum_with_model as spectrum_with_model
from ._posterior import corner_plot as corner_plot
from ._posterior import prior_posterior_plot as prior_posterior_plot
from ._posterior import trace_plot as trace_plot
from ._training import emulator_error_histogram as emulator_error_histogram
from ._training import loss_curves as loss_curves
from ._training import pixel_error_plot as pixel_error_plot
from ._validation import validation_report_plot as validation_report_plot

__all__ = [
    "Figures",
    "corner_plot",
    "coverage",
    "coverage_plot",
    "emulator_error_histogram",
    "figures_from_files",
    "fit_vs_truth",
    "loss_curves",
    "pixel_error_plot",
    "prior_posterior_plot",
    "spectrum_with_model",
    "trace_plot",
    "validation_report_plot",
]
