"""The package's exception and warning classes, in one leaf module.

Every part raises these; users catch them as ``payne_lite.FileFormatError`` etc.
"""

from __future__ import annotations

__all__ = [
    "ErrorModelWarning",
    "FileFormatError",
    "KilledWorkerError",
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


class KilledWorkerError(RuntimeError):
    """On a Dask cluster, the workers that ran one chunk of a catalog run died each
    time (distributed's ``KilledWorker``: the scheduler gives a task up after
    ``distributed.scheduler.allowed-failures`` workers died running it); the run
    stopped.

    The chunks recorded before it are kept in the run's parts folder; the same
    ``fit_catalog`` call (or ``payne-lite fit`` command) fits only the chunks that
    are missing. Workers that die on a chunk usually run out of memory (give them
    more, or use a smaller ``chunk_size`` with ``restart=True``), or crash on its
    spectra (fit its rows in one process to see).

    ``chunk``: the chunk's index; ``rows``: its ``(start, stop)`` catalog rows, or
    None when its rows are not one slice (visits of stars, ``group=True``).
    """

    def __init__(self, message: str, chunk: int, rows: tuple[int, int] | None = None):
        super().__init__(message)
        self.chunk, self.rows = chunk, rows


class WavelengthGridWarning(UserWarning):
    """Spectra on a grid of the emulator's length that is not the emulator's grid."""


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite, or exploded; the run was stopped.

    The last checkpoint written before it (``train_emulator(..., checkpoint=...)``)
    is kept as it was.
    """


class ErrorModelWarning(UserWarning):
    """An error model too poor for what was asked of it: generalised least squares
    (``estimator="gls"``) with an emulator basis of too few components, whose
    errors come out too small at high S/N."""


class SamplingWarning(UserWarning):
    """A posterior that did not pass its convergence rule (or fell back)."""
