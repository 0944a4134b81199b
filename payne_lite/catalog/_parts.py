"""Resume bookkeeping of fit_catalog: the parts folder, its manifest, run identity.

A run's identity (the catalog files, digests of the emulator, MDN and options) is
recorded in ``<path_out>.parts/manifest.json``; each chunk's results are written there
as one file, atomically, so a killed run resumes where it stopped (see
:func:`payne_lite.catalog.fit_catalog`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ._apogee import ApogeeFitsCatalog
from ._hdf5 import HDF5Catalog

_log = logging.getLogger("payne_lite.catalog")  # one logger per stage

#: Layout of the parts folder of a fit_catalog run (see :func:`fit_catalog`).
PARTS_FORMAT = "payne_lite.fit_catalog.parts"
PARTS_VERSION = 1
#: The parts folder of ``results.fits`` is ``results.fits.parts`` (same folder).
PARTS_SUFFIX = ".parts"
_MANIFEST = "manifest.json"
#: meta keys a part file carries and the final table does not.
_PART_KEYS = ("parts_key", "chunk", "rows")
#: fit() options that do not change the numbers, so a resume may change them.
_NOT_IDENTITY = ("n_threads",)


def parts_folder(path_out: str | os.PathLike) -> Path:
    """The folder where :func:`fit_catalog` keeps per-chunk results for ``path_out``."""
    path_out = Path(path_out)
    return path_out.with_name(path_out.name + PARTS_SUFFIX)


def _feed(h, obj) -> None:
    """Feed a canonical byte form of ``obj`` to the hash ``h``."""
    if obj is None or isinstance(obj, bool | int | float | str):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
    elif isinstance(obj, bytes):
        h.update(b"bytes:" + obj + b";")
    elif isinstance(obj, dict):
        h.update(b"dict{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        # the model itself, not its provenance (history, meta) or caches (_*)
        h.update(f"{type(obj).__name__}(".encode())
        for f in dataclasses.fields(obj):
            if f.name in ("history", "meta") or f.name.startswith("_"):
                continue
            _feed(h, f.name)
            _feed(h, getattr(obj, f.name))
        h.update(b")")
    elif isinstance(obj, tuple | list):
        h.update(f"{type(obj).__name__}[".encode())
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, np.generic) or hasattr(obj, "__array__"):
        a = np.ascontiguousarray(np.asarray(obj))
        h.update(f"array:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    else:
        raise TypeError(
            f"cannot record {type(obj).__name__} {obj!r} in the fit_catalog manifest; "
            "pass plain numbers, strings, lists, dicts or arrays"
        )


def _digest(obj) -> str:
    """sha256 (hex) of ``obj``'s canonical form (arrays by dtype, shape and bytes)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _input_identity(cat, grids=None) -> dict:
    """What identifies the catalog: its files (resolved path, size, mtime), rows,
    grid (every row's, from ``grids``, for a catalog with one grid per spectrum)."""
    ident = {
        "n_spec": len(cat),
        "n_pix": int(cat.n_pix),
        "wavelength_sha256": (
            _digest(cat.wavelength) if grids is None else grids.sha256
        ),
        "has_mask": bool(cat.has_mask),
        "has_ids": bool(cat.has_ids),
    }
    if grids is not None:  # absent for one grid: earlier runs' identities hold
        ident["per_row_wavelength"] = True
    if isinstance(cat, HDF5Catalog):
        paths = [cat.path]
    elif isinstance(cat, ApogeeFitsCatalog):
        paths = cat.paths
        ident["bad_bits"] = cat.bad_bits
        # absent when nothing was normalised and the combined rows were read, so
        # that the identities of earlier runs of aspcapStar files hold
        cont = cat.provenance()["continuum"]
        if cont.get("method") != "none" or cat.visits:
            ident["continuum"] = cont
            ident["visits"] = cat.visits
    elif cat.paths:  # the other registered readers: name, settings and files
        paths = cat.paths
        ident["reader"] = cat.name
        ident["reader_options"] = cat.options()
    else:  # a reader of no files: its description is all there is
        ident["source"] = cat.source
        return ident
    files = []
    for p in paths:
        st = p.stat()
        files.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    # a few files are listed (readable in an error message); many are hashed
    ident["files"] = files if len(files) <= 4 else _digest(files)
    return ident


def run_identity(
    cat, emulator, *, mdn, method, chunk_size, mask, p0, fit_kwargs, grids=None,
    group=None,
):  # fmt: skip
    """Everything a resumed run must share with the run that wrote the parts.

    ``grids``: the :class:`CatalogGrids` of a catalog with one grid per spectrum
    (their digest covers every row's grid), else None. ``group``: the digest of
    the star ids of a joint fit of visits (:class:`StarChunks`), else None (then
    absent, so that earlier runs' identities hold)."""
    opts = {k: v for k, v in fit_kwargs.items() if k not in _NOT_IDENTITY}
    opts.pop("mdn", None)
    if hasattr(opts.get("options"), "n_threads"):  # threads never change results
        opts["options"] = dataclasses.replace(opts["options"], n_threads=None)
    ident = {
        "input": _input_identity(cat, grids),
        "emulator_sha256": _digest(emulator),
        "mdn_sha256": None if mdn is None else _digest(mdn),
        "method": method,
        "chunk_size": chunk_size,
        "mask_sha256": None if mask is None else _digest(mask),
        "p0_sha256": None if p0 is None else _digest(np.asarray(p0, np.float64)),
        "fit_options_sha256": _digest(opts),
        "fit_options": sorted(opts),
    }
    if group is not None:
        ident["group_sha256"] = group
    return json.loads(json.dumps(ident))  # as it reads back from the manifest


def _differences(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _differences(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def _is_temp(p: Path) -> bool:
    return p.name.startswith(".") and ".tmp" in p.name


def _atomic_write_text(path: Path, text: str) -> None:
    from ._results import disk_error

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        raise disk_error(err, path) from err
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def read_manifest(path: Path) -> dict:
    """A parts folder's ``manifest.json``, checked (format and version)."""
    try:
        man = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(man, dict) or man.get("format") != PARTS_FORMAT:
        raise FileFormatError(f"{path}: not a {PARTS_FORMAT} manifest")
    if man.get("format_version") != PARTS_VERSION:
        raise FileFormatError(
            f"{path}: {PARTS_FORMAT} format_version={man.get('format_version')!r} "
            f"is not supported (this payne_lite reads [{PARTS_VERSION}]); pass "
            "restart=True (payne-lite fit --restart) to discard those results"
        )
    return man


class Parts:
    """The parts folder of one fit_catalog run: a manifest and one file per chunk.

    A chunk's file (``chunk-000012.h5``, :func:`payne_lite.write_results`' HDF5) is
    written under a temporary name and renamed, so it exists only complete; its meta
    repeats the run key, chunk index and rows. The manifest (JSON, also replaced
    atomically) holds the run identity and, for progress, the chunks done.
    ``bounds``: each chunk's ``(start, stop)`` catalog rows, or, for joint fits of
    visits (one table row per star), its range of stars.
    """

    def __init__(self, folder: Path, identity: dict, bounds, done: set[int]):
        self.folder, self.identity, self.bounds = folder, identity, bounds
        self.key = _digest(identity)
        self.done = done
        self.created = not done

    @classmethod
    def open(cls, path_out: Path, identity: dict, bounds, *, restart: bool):
        folder = parts_folder(path_out)
        manifest = folder / _MANIFEST
        if folder.exists() and not folder.is_dir():
            raise FileExistsError(f"{folder} exists and is not a folder; move it away")
        if folder.is_dir():
            if not manifest.exists():
                other = [p.name for p in folder.iterdir() if not _is_temp(p)]
                if other:
                    raise FileExistsError(
                        f"{folder} exists but holds no {_MANIFEST} (found "
                        f"{', '.join(sorted(other)[:3])}): not a fit_catalog parts "
                        "folder; move it away"
                    )
            elif restart:
                read_manifest(manifest)  # only ever delete a parts folder
                shutil.rmtree(folder)
            else:
                old = read_manifest(manifest)
                if old["identity"] != identity:
                    diff = _differences(old["identity"], identity)
                    raise ValueError(
                        f"cannot resume: {folder} holds results of a run with other "
                        f"inputs or options (differs: {', '.join(diff)}); rerun with "
                        "the same inputs and options, or pass restart=True "
                        "(payne-lite fit --restart) to discard those results"
                    )
        folder.mkdir(exist_ok=True)
        for p in folder.iterdir():  # left by a run killed while writing
            if _is_temp(p):
                p.unlink()
        parts = cls(folder, identity, bounds, set())
        parts.done = parts._scan()
        parts.created = not parts.done
        parts._write_manifest()
        return parts

    def file(self, i: int) -> Path:
        return self.folder / f"chunk-{i:06d}.h5"

    def _scan(self) -> set[int]:
        """Indices of the chunks whose files are complete and belong to this run;
        files that do not (another run's, a wrong length) are removed."""
        done = set()
        for i in range(len(self.bounds)):
            p = self.file(i)
            if not p.exists():
                continue
            try:
                self.read(i)
            except (OSError, ValueError) as err:
                _log.warning("%s: refitting chunk %d (%s)", p, i, err)
                p.unlink()
                continue
            done.add(i)
        return done

    def _write_manifest(self) -> None:
        man = {
            "format": PARTS_FORMAT,
            "format_version": PARTS_VERSION,
            "identity": self.identity,
            "key": self.key,
            "n_chunks": len(self.bounds),
            "done": sorted(self.done),
        }
        _atomic_write_text(self.folder / _MANIFEST, json.dumps(man, indent=1) + "\n")

    def missing(self) -> list[int]:
        return [i for i in range(len(self.bounds)) if i not in self.done]

    def write(self, i: int, table) -> None:
        """Record chunk ``i``'s results (atomically), then the manifest."""
        from ._results import write_results

        start, stop = self.bounds[i]
        if len(table) != stop - start:
            raise RuntimeError(
                f"chunk {i}: {len(table)} result rows for rows [{start}, {stop})"
            )
        table = table.copy(copy_data=False)
        table.meta.update(parts_key=self.key, chunk=i, rows=[start, stop])
        write_results(table, self.file(i), overwrite=True)
        self.done.add(i)
        self._write_manifest()

    def read(self, i: int):
        """Chunk ``i``'s results table, checked to be this run's and complete."""
        from ._results import read_results

        p = self.file(i)
        t = read_results(p)
        start, stop = self.bounds[i]
        got = (t.meta.get("parts_key"), t.meta.get("chunk"), t.meta.get("rows"))
        if got != (self.key, i, [start, stop]) or len(t) != stop - start:
            raise FileFormatError(
                f"{p}: not chunk {i} (rows [{start}, {stop})) of this run"
            )
        for k in _PART_KEYS:
            t.meta.pop(k)
        return t

    def remove(self) -> None:
        """Delete the folder: chunk files first, the manifest last."""
        for i in range(len(self.bounds)):
            with contextlib.suppress(FileNotFoundError):
                self.file(i).unlink()
        with contextlib.suppress(FileNotFoundError):
            (self.folder / _MANIFEST).unlink()
        shutil.rmtree(self.folder, ignore_errors=True)
