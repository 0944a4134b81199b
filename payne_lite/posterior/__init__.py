"""payne_lite.posterior: see the modules inside; public names re-exported here.

``_sample`` (:func:`sample`, :func:`log_posterior`; the method's description),
``_likelihood`` (the jitted log posterior), ``_problem`` (inputs, per-star targets,
starting points), ``_emcee`` / ``_nuts`` / ``_is`` (one star's sampler),
``_diagnostics`` (convergence diagnostics), ``_arviz`` (samples as ArviZ data:
:func:`to_inference_data`, :func:`to_datatree`), ``_rows`` (what a sampler reports per
star: ``StarDraws``, ``LMSolution``), ``_table`` (the results table), ``_io``
(:class:`PosteriorSamples`, :func:`save_samples`, :func:`load_samples`).
"""

from __future__ import annotations

from ._arviz import to_datatree as to_datatree
from ._arviz import to_inference_data as to_inference_data
from ._diagnostics import chain_diagnostics as chain_diagnostics
from ._diagnostics import ess_mcse as ess_mcse
from ._diagnostics import kish_ess as kish_ess
from ._diagnostics import rank_rhat as rank_rhat
from ._diagnostics import weighted_quantiles as weighted_quantiles
from ._io import SAMPLES_FORMAT as SAMPLES_FORMAT
from ._io import PosteriorSamples as PosteriorSamples
from ._io import load_samples as load_samples
from ._io import save_samples as save_samples
from ._sample import METHODS as METHODS
from ._sample import log_posterior as log_posterior
from ._sample import sample as sample

__all__ = [
    "METHODS",
    "PosteriorSamples",
    "SAMPLES_FORMAT",
    "chain_diagnostics",
    "ess_mcse",
    "kish_ess",
    "load_samples",
    "log_posterior",
    "rank_rhat",
    "sample",
    "save_samples",
    "to_datatree",
    "to_inference_data",
    "weighted_quantiles",
]
