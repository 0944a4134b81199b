"""Checkpoints of an emulator training run: one HDF5 file per run, written
atomically, with the identity (config, grid digests, dtype, layout) a resumed run
must match. Host-side only; used by :mod:`payne_lite.emulator._train`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from .. import _h5
from ..errors import FileFormatError
from ..grid import SpectralGrid

log = logging.getLogger("payne_lite.emulator")  # one logger per stage


CHECKPOINT_FORMAT = "payne_lite.TrainCheckpoint"
CHECKPOINT_VERSION = 1
#: TrainConfig fields that may differ between a checkpoint and the run resuming it.
RESUMABLE_CHANGES = ("max_iter",)


def grid_digest(grid: SpectralGrid) -> str:
    """sha256 of a grid's numbers and names (what a checkpoint was trained on)."""
    h = hashlib.sha256()
    for a in (grid.wavelength, grid.labels, grid.flux, *grid.label_box):
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    if grid.flux_err is not None:
        h.update(np.ascontiguousarray(grid.flux_err, np.float64).tobytes())
    h.update(json.dumps(list(grid.label_names)).encode())
    return h.hexdigest()


class TrainCheckpoint:
    """A training run's state in one HDF5 file, written atomically, with its identity.

    Layout (``format = "payne_lite.TrainCheckpoint"``, ``format_version = 1``):
    attrs ``identity`` (JSON: the TrainConfig, sha256 digests of the training and
    validation grids, dtype, optimiser, padded pixel count), ``iteration`` (completed
    iterations), ``history`` and ``rng_state`` (JSON); datasets ``state/<name>``
    (parameters, damping or optimiser state, best parameters) and ``tracker/<name>``
    (per-pixel best losses, patience counters, restarts, active flags).
    """

    def __init__(self, path, identity: dict, every: int):
        self.path = Path(path)
        self.identity = identity
        self.every = every
        self.last_iteration = None  # iterations completed at the last write

    def check(self, resume: bool) -> dict | None:
        """The saved state to resume from, or None to start afresh."""
        if not self.path.exists():
            if resume:
                log.info("%s: no checkpoint yet, starting from scratch", self.path)
            return None
        if not resume:
            raise FileExistsError(
                f"checkpoint {self.path} exists; pass resume=True (payne-lite train "
                "--resume) to continue from it, or remove it"
            )
        return self.load()

    def load(self) -> dict:
        with _h5.open_checked(self.path, CHECKPOINT_FORMAT, (CHECKPOINT_VERSION,)) as f:
            saved = _h5.get_json_attr(f, "identity", self.path)
            diff = _identity_differences(saved, self.identity)
            if diff:
                raise ValueError(
                    f"checkpoint {self.path} was written by another training run: "
                    + "; ".join(diff)
                    + " (use a new checkpoint path, or the settings it was written with)"
                )
            out = {
                "iteration": int(f.attrs["iteration"]),
                "history": _h5.get_json_attr(f, "history", self.path),
                "rng_state": _h5.get_json_attr(f, "rng_state", self.path),
                "elapsed": float(f.attrs["elapsed"]),
            }
            for group in ("state", "tracker"):
                if group not in f:
                    raise FileFormatError(f"{self.path}: missing group {group!r}")
                out[group] = {
                    k: _h5.read_dataset(f[group], k, self.path) for k in f[group]
                }
        self.last_iteration = out["iteration"]
        return out

    def save(self, iteration, state: dict, tracker, hist, rng, elapsed) -> None:
        with _h5.atomic_h5_writer(
            self.path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION
        ) as f:
            _h5.set_json_attr(f, "identity", self.identity)
            _h5.set_json_attr(f, "history", hist)
            _h5.set_json_attr(f, "rng_state", rng.bit_generator.state)
            f.attrs["iteration"] = int(iteration)
            f.attrs["elapsed"] = float(elapsed)
            g = f.create_group("state")
            for k, v in state.items():
                _h5.write_dataset(g, k, np.asarray(v), compress=False)
            g = f.create_group("tracker")
            for k in ("best", "best_mae", "stall", "restarts", "active"):
                _h5.write_dataset(g, k, getattr(tracker, k), compress=False)
        self.last_iteration = int(iteration)
        log.debug("%s: checkpoint after %d iterations", self.path, iteration)

    def describe(self) -> str:
        if self.last_iteration is None:
            return f"no checkpoint was written to {self.path} before it"
        return (
            f"the checkpoint {self.path} from iteration {self.last_iteration} is kept"
        )


def _identity_differences(saved: dict, now: dict) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"{key}.{k}: {a.get(k)!r} in the checkpoint, {b.get(k)!r} now"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif a != b:
            what = "another grid" if key.endswith("grid_sha256") else f"{a!r}"
            out.append(f"{key}: {what} in the checkpoint, {b!r} now")
    return out


def _restore_tracker(tracker, saved: dict, n_tot: int) -> None:
    """Set the per-pixel arrays (n_tot,) of a ``_PixelTracker`` from a checkpoint."""
    for k, v in saved.items():
        v = np.asarray(v)
        if v.shape != (n_tot,):
            raise FileFormatError(f"tracker/{k} has shape {v.shape}, not ({n_tot},)")
        setattr(tracker, k, v.astype(getattr(tracker, k).dtype))


def resume_state(ckpt, resume, n_tot, optimizer, tracker, rng, hist):
    """Load a checkpoint into ``tracker``, ``rng`` and ``hist``; its arrays, the
    iterations done and the seconds spent (or None, 0, 0 to start afresh)."""
    if ckpt is None:
        return None, 0, 0.0
    ckpt.identity.update(optimizer=optimizer, n_pix_padded=int(n_tot))
    saved = ckpt.check(resume)
    if saved is None:
        return None, 0, 0.0
    _restore_tracker(tracker, saved["tracker"], n_tot)
    rng.bit_generator.state = saved["rng_state"]
    for k in list(hist):
        hist[k] = list(saved["history"].get(k, []))
    log.info("%s: resuming after %d iterations", ckpt.path, saved["iteration"])
    return saved["state"], saved["iteration"], saved["elapsed"]


def state_array(state: dict, name: str, shape, dtype, path) -> np.ndarray:
    """Array ``state/<name>`` of a checkpoint, checked to have ``shape``, as ``dtype``."""
    a = np.asarray(state.get(name))
    if a.shape != tuple(shape):
        raise FileFormatError(
            f"{path}: state/{name} has shape {a.shape}, expected {tuple(shape)}"
        )
    return a.astype(dtype)
