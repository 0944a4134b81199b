"""payne_lite.observe: see the modules inside; public names re-exported here."""

from __future__ import annotations

from . import broadening as broadening
from ._cache import cached_obs_model as cached_obs_model
from ._calibrate import calibrate_emulator_errors as calibrate_emulator_errors
from ._calibrate import emulator_error_z as emulator_error_z
from ._chippoly import ChipPolynomial as ChipPolynomial
from ._chippoly import FitContinuum as FitContinuum
from ._chippoly import as_continuum as as_continuum
from ._chippoly import continuum_meta as continuum_meta
from ._chippoly import continuum_names as continuum_names
from ._continuum import APOGEE_CHIPS as APOGEE_CHIPS
from ._continuum import MIN_PIXELS_PER_COEF as MIN_PIXELS_PER_COEF
from ._continuum import NORMALIZERS as NORMALIZERS
from ._continuum import ContinuumPixels as ContinuumPixels
from ._continuum import NoNormalization as NoNormalization
from ._continuum import Normalized as Normalized
from ._continuum import Normalizer as Normalizer
from ._continuum import SigmaClipped as SigmaClipped
from ._continuum import normalizer as normalizer
from ._doppler import DOPPLER_INTERP as DOPPLER_INTERP
from ._doppler import SEARCH_INTERP as SEARCH_INTERP
from ._doppler import TAP_OFFSETS as TAP_OFFSETS
from ._doppler import LogGrid as LogGrid
from ._doppler import Shifted as Shifted
from ._doppler import complete_rest as complete_rest
from ._doppler import doppler_shift as doppler_shift
from ._doppler import embed as embed
from ._doppler import gap_cum as gap_cum
from ._doppler import kernel_reach as kernel_reach
from ._doppler import log_position as log_position
from ._doppler import make_log_grid as make_log_grid
from ._doppler import make_lookup as make_lookup
from ._doppler import shift_pair as shift_pair
from ._doppler import tap_weights as tap_weights
from ._instrument import Instrument as Instrument
from ._lsf import rest_segments as rest_segments
from ._model import BROADENING_PARAMS as BROADENING_PARAMS
from ._model import BROADENING_RANGE as BROADENING_RANGE
from ._model import LABEL_BOUND as LABEL_BOUND
from ._model import RV_RANGE as RV_RANGE
from ._model import BroadSpec as BroadSpec
from ._model import JetNet as JetNet
from ._model import ObsModel as ObsModel
from ._model import ParamLayout as ParamLayout
from ._model import build_obs_model as build_obs_model
from ._model import embed_obs as embed_obs
from ._model import jet_rows as jet_rows
from ._model import lsf_sigma_pixels as lsf_sigma_pixels
from ._model import make_model as make_model
from ._model import normal_equations as normal_equations
from ._model import observe as observe
from ._model import observe_jac as observe_jac
from ._model import observe_jac_t as observe_jac_t
from ._model import param_blocks as param_blocks
from ._model import param_layout as param_layout
from ._model import param_order as param_order
from ._model import rest_model as rest_model
from ._model import shift_span as shift_span
from ._model import span_pixels as span_pixels
from ._model import weighted_residuals as weighted_residuals
from ._model import window_valid as window_valid
from ._noise import ErrorModel as ErrorModel
from ._noise import basis_on as basis_on
from ._noise import basis_placer as basis_placer
from ._noise import build_error_model as build_error_model
from ._noise import diagonal_variance as diagonal_variance
from ._noise import log_det as log_det
from ._noise import low_rank_pieces as low_rank_pieces
from ._noise import woodbury_information as woodbury_information
from ._problem import BROADENING_START as BROADENING_START
from ._problem import MDN_NSIGMA as MDN_NSIGMA
from ._problem import RV_WINDOW as RV_WINDOW
from ._problem import check_fixed as check_fixed
from ._problem import check_inputs as check_inputs
from ._problem import check_rv_range as check_rv_range
from ._problem import emulator_error_on as emulator_error_on
from ._problem import fill_grid as fill_grid
from ._problem import teff_index as teff_index

__all__ = [
    "APOGEE_CHIPS",
    "ChipPolynomial",
    "as_continuum",
    "continuum_meta",
    "continuum_names",
    "ContinuumPixels",
    "FitContinuum",
    "MIN_PIXELS_PER_COEF",
    "NORMALIZERS",
    "Normalized",
    "Normalizer",
    "NoNormalization",
    "SigmaClipped",
    "normalizer",
    "BROADENING_PARAMS",
    "BROADENING_RANGE",
    "BROADENING_START",
    "BroadSpec",
    "Instrument",
    "JetNet",
    "LABEL_BOUND",
    "LogGrid",
    "MDN_NSIGMA",
    "ObsModel",
    "ParamLayout",
    "RV_RANGE",
    "RV_WINDOW",
    "broadening",
    "build_obs_model",
    "cached_obs_model",
    "check_fixed",
    "check_inputs",
    "check_rv_range",
    "doppler_shift",
    "embed",
    "embed_obs",
    "emulator_error_on",
    "ErrorModel",
    "calibrate_emulator_errors",
    "emulator_error_z",
    "basis_on",
    "basis_placer",
    "build_error_model",
    "diagonal_variance",
    "log_det",
    "low_rank_pieces",
    "woodbury_information",
    "fill_grid",
    "gap_cum",
    "lsf_sigma_pixels",
    "rest_segments",
    "make_log_grid",
    "make_lookup",
    "make_model",
    "jet_rows",
    "normal_equations",
    "param_blocks",
    "param_order",
    "observe",
    "observe_jac",
    "observe_jac_t",
    "param_layout",
    "rest_model",
    "shift_pair",
    "shift_span",
    "span_pixels",
    "DOPPLER_INTERP",
    "SEARCH_INTERP",
    "TAP_OFFSETS",
    "Shifted",
    "log_position",
    "tap_weights",
    "teff_index",
    "window_valid",
    "complete_rest",
    "kernel_reach",
]
