"""payne_lite.posterior: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._posterior import METHODS as METHODS
from ._posterior import SAMPLES_FORMAT as SAMPLES_FORMAT
from ._posterior import PosteriorSamples as PosteriorSamples
from ._posterior import chain_diagnostics as chain_diagnostics
from ._posterior import kish_ess as kish_ess
from ._posterior import load_samples as load_samples
from ._posterior import log_posterior as log_posterior
from ._posterior import sample as sample
from ._posterior import save_samples as save_samples
from ._posterior import split_rhat as split_rhat
from ._posterior import weighted_quantiles as weighted_quantiles

__all__ = [
    "METHODS",
    "PosteriorSamples",
    "SAMPLES_FORMAT",
    "chain_diagnostics",
    "kish_ess",
    "load_samples",
    "log_posterior",
    "sample",
    "save_samples",
    "split_rhat",
    "weighted_quantiles",
]
