"""payne_lite: fit stellar spectra with per-pixel neural-network emulators in JAX.

Please cite Ting et al. 2019 (ApJ 879, 69), "The Payne", whose method this implements.
"""

from __future__ import annotations

from . import _jaxcheck  # noqa: F401  (warns about known-bad jaxlib builds)
from . import datasets as datasets
from . import spectra as spectra
from ._api import fit as fit
from ._compile import compilation_cache_dir as compilation_cache_dir
from ._compile import enable_default_cache as _enable_default_cache
from ._compile import set_compilation_cache as set_compilation_cache
from ._memory import limit_malloc_arenas as _limit_malloc_arenas
from ._serial import clear_caches as clear_caches
from ._version import __version__ as __version__
from .catalog import check_catalog as check_catalog
from .catalog import fit_catalog as fit_catalog
from .catalog import iter_catalog as iter_catalog
from .catalog import model_from_results, read_results, write_results
from .catalog import open_catalog as open_catalog
from .catalog import write_catalog as write_catalog
from .emulator import DenseNet as DenseNet
from .emulator import Emulator as Emulator
from .emulator import PixelNet as PixelNet
from .emulator import TrainConfig, train_emulator
from .emulator import ValidationReport as ValidationReport
from .errors import FileFormatError as FileFormatError
from .errors import KilledWorkerError as KilledWorkerError
from .errors import OutputLockedError as OutputLockedError
from .errors import SamplingWarning as SamplingWarning
from .errors import SchedulerLostError as SchedulerLostError
from .errors import TrainingDivergedError as TrainingDivergedError
from .errors import WavelengthGridWarning as WavelengthGridWarning
from .fitting import check_results_schema as check_results_schema
from .fitting import companion_search as companion_search
from .fitting import pixel_residuals as pixel_residuals
from .grid import SpectralGrid as SpectralGrid
from .mdn import MDN as MDN
from .mdn import FlowConfig as FlowConfig
from .mdn import MDNConfig as MDNConfig
from .mdn import train_flow as train_flow
from .mdn import train_mdn as train_mdn
from .observe import (
    ChipPolynomial,
    ContinuumPixels,
    FitContinuum,
    Instrument,
    NoNormalization,
    Normalizer,
    SigmaClipped,
    broadening,
    calibrate_emulator_errors,
)
from .observe.broadening import air_to_vacuum, vacuum_to_air
from .options import CurveFitOptions as CurveFitOptions
from .options import EmceeOptions as EmceeOptions
from .options import ISOptions as ISOptions
from .options import LMOptions as LMOptions
from .options import NUTSOptions as NUTSOptions
from .posterior import PosteriorSamples as PosteriorSamples
from .posterior import load_samples as load_samples
from .posterior import log_posterior as log_posterior
from .posterior import sample as sample
from .posterior import save_samples as save_samples

_enable_default_cache()  # JAX's persistent compilation cache (see payne_lite._compile)
_limit_malloc_arenas()  # resident memory flat over many fits (see payne_lite._memory)

__all__ = [
    "calibrate_emulator_errors",
    "CurveFitOptions",
    "EmceeOptions",
    "FlowConfig",
    "ISOptions",
    "ChipPolynomial",
    "ContinuumPixels",
    "FitContinuum",
    "Instrument",
    "NoNormalization",
    "Normalizer",
    "SigmaClipped",
    "LMOptions",
    "NUTSOptions",
    "DenseNet",
    "Emulator",
    "FileFormatError",
    "KilledWorkerError",
    "OutputLockedError",
    "MDN",
    "MDNConfig",
    "PixelNet",
    "PosteriorSamples",
    "SamplingWarning",
    "SchedulerLostError",
    "SpectralGrid",
    "TrainConfig",
    "TrainingDivergedError",
    "ValidationReport",
    "WavelengthGridWarning",
    "air_to_vacuum",
    "broadening",
    "check_results_schema",
    "pixel_residuals",
    "companion_search",
    "clear_caches",
    "compilation_cache_dir",
    "datasets",
    "spectra",
    "fit",
    "check_catalog",
    "fit_catalog",
    "iter_catalog",
    "load_samples",
    "log_posterior",
    "model_from_results",
    "open_catalog",
    "read_results",
    "sample",
    "save_samples",
    "set_compilation_cache",
    "train_emulator",
    "train_flow",
    "train_mdn",
    "vacuum_to_air",
    "write_catalog",
    "write_results",
]
