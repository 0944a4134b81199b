"""payne_lite.fitting: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._fitter import FLAG_BITS as FLAG_BITS
from ._fitter import FLAG_FAILED as FLAG_FAILED
from ._fitter import FLAG_NOT_CONVERGED as FLAG_NOT_CONVERGED
from ._fitter import FLAG_POOR_FIT as FLAG_POOR_FIT
from ._fitter import METHODS as METHODS
from ._fitter import fit_spectra as fit_spectra
from ._fitter import poor_fit as poor_fit
from ._fitter import visit_index as visit_index

__all__ = [
    "FLAG_BITS",
    "FLAG_FAILED",
    "FLAG_NOT_CONVERGED",
    "FLAG_POOR_FIT",
    "METHODS",
    "fit_spectra",
    "poor_fit",
    "visit_index",
]
