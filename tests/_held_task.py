"""A catalog task that holds one chosen chunk until the test says so (for the Dask
fault tests of tests/test_scale.py).

:class:`HoldChunk` wraps :func:`payne_lite.catalog._runner.fit_rows`: the first time
it is given the chunk whose first id is ``first_id``, it writes its process id to
``<folder>/held-<pid>`` and waits (up to ``timeout`` s) for ``<folder>/release``, so
that a test can kill that worker, or the scheduler, while the chunk is being fitted.
Every call (held or not) leaves ``<folder>/ran-<first id>-<pid>-<n>``. The module is
pickled by value (``cloudpickle.register_pickle_by_value``), so workers need not
import it.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path


class HoldChunk:
    def __init__(self, folder, first_id: str, timeout: float = 60.0):
        self.folder, self.first_id, self.timeout = str(folder), first_id, timeout

    def __call__(self, chunk, **kwargs):
        from payne_lite.catalog._runner import fit_rows

        folder, pid = Path(self.folder), os.getpid()
        first = str(chunk.ids[0])
        if first == self.first_id and not list(folder.glob("held-*")):
            (folder / f"held-{pid}").write_text("")
            deadline = time.monotonic() + self.timeout
            while not (folder / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        table = fit_rows(chunk, **kwargs)
        (folder / f"ran-{first}-{pid}-{uuid.uuid4().hex[:6]}").write_text("")
        return table


class DieOnChunk:
    """A catalog task whose process dies (``os._exit``) whenever it is given the
    chunk whose first id is ``first_id``, after leaving ``<folder>/died-<pid>``;
    other chunks are fitted as usual."""

    def __init__(self, folder, first_id: str):
        self.folder, self.first_id = str(folder), first_id

    def __call__(self, chunk, **kwargs):
        from payne_lite.catalog._runner import fit_rows

        if str(chunk.ids[0]) == self.first_id:
            (Path(self.folder) / f"died-{os.getpid()}").write_text("")
            time.sleep(0.3)  # dies in the middle of the chunk, as out of memory
            os._exit(3)
        return fit_rows(chunk, **kwargs)
