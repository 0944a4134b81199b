"""The package's exception and warning classes, in one leaf module.

Every part raises these; users catch them as ``payne_lite.FileFormatError`` etc.
"""

from __future__ import annotations

__all__ = [
    "FileFormatError",
    "SamplingWarning",
    "TrainingDivergedError",
    "WavelengthGridWarning",
]


class FileFormatError(ValueError):
    """A file is corrupt, truncated, of another kind or of an unsupported version."""


class WavelengthGridWarning(UserWarning):
    """Spectra on a grid of the emulator's length that is not the emulator's grid."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite, or exploded; the run was stopped.

    The last checkpoint written before it (``train_emulator(..., checkpoint=...)``)
    is kept as it was.
    """


class SamplingWarning(UserWarning):
    """A posterior that did not pass its convergence rule (or fell back)."""
