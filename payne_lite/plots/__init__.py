"""payne_lite.plots: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._plots import Figures as Figures
from ._plots import corner_plot as corner_plot
from ._plots import coverage as coverage
from ._plots import coverage_plot as coverage_plot
from ._plots import emulator_error_histogram as emulator_error_histogram
from ._plots import figures_from_files as figures_from_files
from ._plots import fit_vs_truth as fit_vs_truth
from ._plots import loss_curves as loss_curves
from ._plots import pixel_error_plot as pixel_error_plot
from ._plots import prior_posterior_plot as prior_posterior_plot
from ._plots import spectrum_with_model as spectrum_with_model
from ._plots import trace_plot as trace_plot

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
]
