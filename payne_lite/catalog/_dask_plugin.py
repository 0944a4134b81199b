"""The worker plugin that carries one catalog run's settings to every Dask worker.

Its own module because it subclasses ``distributed.WorkerPlugin``: imported only when
a run uses a cluster, so ``import payne_lite`` does not import dask.
"""

from __future__ import annotations

import pickle
import uuid

import cloudpickle
from distributed import WorkerPlugin


class Settings(WorkerPlugin):
    """A worker plugin holding one run's task settings (the emulator among them).

    Pickled once here (cloudpickle, as Dask does); each worker unpickles it once, in
    :meth:`setup`. Its name is unique to the run, so two runs with the same settings
    on one scheduler do not remove each other's plugin; the run removes it when it
    ends. A run whose own process is killed leaves it on the scheduler (one copy of
    the settings per worker) until the cluster restarts.
    """

    idempotent = False

    def __init__(self, settings: dict):
        self.blob = cloudpickle.dumps(settings, protocol=pickle.HIGHEST_PROTOCOL)
        self.name = f"payne-lite-settings-{uuid.uuid4().hex}"
        self.settings: dict | None = None

    def __getstate__(self):
        return {"blob": self.blob, "name": self.name, "settings": None}

    def setup(self, worker=None) -> None:
        self.settings = pickle.loads(self.blob)

    def teardown(self, worker=None) -> None:
        self.settings = None
