"""The package's exception and warning classes, in one leaf module.

Every part raises these; users catch them as ``payne_lite.FileFormatError`` etc.
"""

from __future__ import annotations

__all__ = [
    "FileFormatError",
    "OutputLockedError",
    "SamplingWarning",
    "SchedulerLostError",
    "TrainingDivergedError",
    "WavelengthGridWarning",
]


class FileFormatError(ValueError):
    """A file is corrupt, truncated, of another kind or of an unsupported version."""


class OutputLockedError(RuntimeError):
    """Another live run owns this output (its lock file, ``<output>.lock``).

    ``owner``: what the lock file says of that run (host, pid, start time, command
    line), or None when it could not be read.
    """

    def __init__(self, message: str, owner: dict | None = None):
        super().__init__(message)
        self.owner = owner


class SchedulerLostError(RuntimeError):
    """The Dask scheduler of a catalog run went away (closed, killed, unreachable).

    The chunks recorded before it are kept in the run's parts folder; the same
    ``fit_catalog`` call (or ``payne-lite fit`` command), with a scheduler that is up,
    other workers or none, fits only the chunks that are missing.
    """


class WavelengthGridWarning(UserWarning):
    """Spectra on a grid of the emulator's length that is not the emulator's grid."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite, or exploded; the run was stopped.

    The last checkpoint written before it (``train_emulator(..., checkpoint=...)``)
    is kept as it was.
    """


class SamplingWarning(UserWarning):
    """A posterior that did not pass its convergence rule (or fell back)."""
