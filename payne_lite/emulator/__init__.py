"""payne_lite.emulator: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._active import ACTIVE_STRATEGIES as ACTIVE_STRATEGIES
from ._active import ActiveLearningResult as ActiveLearningResult
from ._active import ErrorMap as ErrorMap
from ._active import active_learning as active_learning
from ._active import propose_labels as propose_labels
from ._active import spectrum_errors as spectrum_errors
from ._emulator import ERROR_SCALE_RANGE as ERROR_SCALE_RANGE
from ._emulator import Emulator as Emulator
from ._emulator import error_scale_features as error_scale_features
from ._file import EMULATOR_FORMAT as EMULATOR_FORMAT
from ._local_error import LOCAL_NEIGHBOURS as LOCAL_NEIGHBOURS
from ._local_error import LOCAL_SHRINK as LOCAL_SHRINK
from ._local_error import LocalError as LocalError
from ._local_error import doppler_shifts as doppler_shifts
from ._local_error import rv_derivative as rv_derivative
from ._nets import ACTIVATIONS as ACTIVATIONS
from ._nets import KERNEL_COMPILER_OPTIONS as KERNEL_COMPILER_OPTIONS
from ._nets import DenseNet as DenseNet
from ._nets import KernelNet as KernelNet
from ._nets import PixelNet as PixelNet
from ._nets import dense_forward as dense_forward
from ._nets import forward as forward
from ._nets import kernel_forward as kernel_forward
from ._nets import kernel_forward_jac as kernel_forward_jac
from ._nets import kernel_layout as kernel_layout
from ._nets import pixel_forward as pixel_forward
from ._nets import predict_batch as predict_batch
from ._nets import predict_kernel as predict_kernel
from ._nets import scale_labels as scale_labels
from ._nets import tanh_rational as tanh_rational
from ._nets import unscale_labels as unscale_labels
from ._report import POOR_FACTOR as POOR_FACTOR
from ._report import POOR_MIN_COUNT as POOR_MIN_COUNT
from ._report import REPORT_BINS as REPORT_BINS
from ._report import BinTable as BinTable
from ._report import ValidationReport as ValidationReport
from ._train import ERROR_BASIS_RANK as ERROR_BASIS_RANK
from ._train import TrainConfig as TrainConfig
from ._train import train_emulator as train_emulator

__all__ = [
    "ACTIVATIONS",
    "ACTIVE_STRATEGIES",
    "ActiveLearningResult",
    "BinTable",
    "DenseNet",
    "EMULATOR_FORMAT",
    "ERROR_BASIS_RANK",
    "ERROR_SCALE_RANGE",
    "Emulator",
    "ErrorMap",
    "KERNEL_COMPILER_OPTIONS",
    "KernelNet",
    "LOCAL_NEIGHBOURS",
    "LOCAL_SHRINK",
    "LocalError",
    "POOR_FACTOR",
    "POOR_MIN_COUNT",
    "PixelNet",
    "REPORT_BINS",
    "TrainConfig",
    "active_learning",
    "ValidationReport",
    "dense_forward",
    "doppler_shifts",
    "error_scale_features",
    "forward",
    "kernel_forward",
    "kernel_forward_jac",
    "kernel_layout",
    "pixel_forward",
    "predict_batch",
    "predict_kernel",
    "rv_derivative",
    "propose_labels",
    "scale_labels",
    "spectrum_errors",
    "tanh_rational",
    "train_emulator",
    "unscale_labels",
]
