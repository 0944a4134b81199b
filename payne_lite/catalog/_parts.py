"""Resume bookkeeping of fit_catalog: the parts folder, its manifest, run identity.

A run's identity (the catalog files, digests of the emulator, MDN and options) is
recorded in ``<path_out>.parts/manifest.json``; each chunk's results are written there
as one file, atomically, so a killed run resumes where it stopped (see
:func:`payne_lite.catalog.fit_catalog`).

The manifest (JSON, format version 2) carries ``sha256``, the SHA-256 of its other
entries (``json.dumps(..., sort_keys=True, separators=(",", ":"))``), checked when it
is read: a damaged manifest (a changed identity would otherwise read as "a run with
other inputs", a changed ``done`` list as progress that is not there) is never
trusted. A resume that finds it damaged rebuilds it when the folder holds chunk files
and every one is a complete chunk of this run (each carries the run's key and its own
checksum), with a RuntimeWarning; otherwise it is refused with ``FileFormatError``
(``restart=True`` discards the folder). Version 1 manifests (no ``sha256``), written by
earlier versions, are read as they are.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np

from ..errors import FileFormatError
from ..observe import Instrument
from ._apogee import ApogeeFitsCatalog
from ._hdf5 import HDF5Catalog

_log = logging.getLogger("payne_lite.catalog")  # one logger per stage

#: Layout of the parts folder of a fit_catalog run (see :func:`fit_catalog`).
PARTS_FORMAT = "payne_lite.fit_catalog.parts"
PARTS_VERSION = 2
#: Manifest versions read (1: no sha256, written by earlier payne_lite versions).
PARTS_READABLE = (1, 2)
#: The parts folder of ``results.fits`` is ``results.fits.parts`` (same folder).
PARTS_SUFFIX = ".parts"
_MANIFEST = "manifest.json"
#: meta keys a part file carries and the final table does not.
_PART_KEYS = ("parts_key", "chunk", "rows")
#: fit() options that do not change the numbers, so a resume may change them.
_NOT_IDENTITY = ("n_threads",)
#: The default Doppler interpolant of the runs whose identity has no instrument.
_OLD_DOPPLER = "cubic6"


def parts_folder(path_out: str | os.PathLike) -> Path:
    """The folder where :func:`fit_catalog` keeps per-chunk results for ``path_out``."""
    path_out = Path(path_out)
    return path_out.with_name(path_out.name + PARTS_SUFFIX)


#: Dataclass fields added after catalog runs could be resumed: left out of the
#: digest when None, so that a run started before they existed resumes.
_ADDED_LATER = frozenset({"error_scale"})


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
            if f.name in _ADDED_LATER and getattr(obj, f.name) is None:
                continue  # absent as before the field existed: the same digest
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
    if opts.get("instrument") is None and Instrument().doppler != _OLD_DOPPLER:
        # the default instrument, every field, once its Doppler interpolant is not
        # the one of the runs before (whose identities then hold): resumed, their
        # parts would mix two models
        opts["instrument"] = Instrument()
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


class DamagedManifestError(FileFormatError):
    """A manifest that is not what was written (unreadable JSON, a checksum that
    does not match, entries of the wrong kind); not raised for another version."""


def manifest_sha256(man: dict) -> str:
    """SHA-256 (hex) of a manifest's entries other than ``sha256``, canonical JSON."""
    body = {k: v for k, v in man.items() if k != "sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def read_manifest(path: Path) -> dict:
    """A parts folder's ``manifest.json``, checked: format, version, checksum
    (version 2) and the kinds of its entries. Raises FileFormatError
    (:class:`DamagedManifestError` for damage, not for another version)."""
    try:
        man = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as err:  # UnicodeDecodeError is a ValueError
        raise DamagedManifestError(f"{path}: unreadable manifest ({err})") from err
    if not isinstance(man, dict) or man.get("format") != PARTS_FORMAT:
        raise DamagedManifestError(f"{path}: not a {PARTS_FORMAT} manifest")
    version = man.get("format_version")
    if isinstance(version, bool) or version not in PARTS_READABLE:
        raise FileFormatError(
            f"{path}: {PARTS_FORMAT} format_version={version!r} "
            f"is not supported (this payne_lite reads {list(PARTS_READABLE)}); pass "
            "restart=True (payne-lite fit --restart) to discard those results"
        )
    if version >= 2 and man.get("sha256") != manifest_sha256(man):
        raise DamagedManifestError(
            f"{path}: damaged manifest (its sha256 does not match its content)"
        )
    done, n = man.get("done", []), man.get("n_chunks", 0)
    if (
        not isinstance(man.get("identity"), dict)
        or not isinstance(n, int)
        or not isinstance(done, list)
        or not all(isinstance(i, int) and 0 <= i < n for i in done)
    ):
        raise DamagedManifestError(f"{path}: damaged manifest (entries of wrong kind)")
    return man


_CHUNK_NAME = re.compile(r"chunk-(\d{6})\.h5")


def _check_only_parts(folder: Path) -> None:
    """Refuse (FileExistsError) to delete ``folder`` unless it holds only what a
    parts folder holds: the manifest, chunk files and temporary files."""
    other = [
        p.name
        for p in folder.iterdir()
        if p.name != _MANIFEST and not _CHUNK_NAME.fullmatch(p.name) and not _is_temp(p)
    ]
    if other:
        raise FileExistsError(
            f"{folder}: its manifest is damaged and it holds other files "
            f"({', '.join(sorted(other)[:3])}): not deleted; move it away"
        )


def _check_all_ours(folder: Path, identity: dict, bounds, err: Exception) -> None:
    """A damaged manifest is rebuilt (RuntimeWarning) only if ``folder`` holds chunk
    files and every one is a complete chunk of the run of ``identity``; else ``err``
    again, with what to do."""
    probe, n_ours = Parts(folder, identity, bounds, set()), 0
    for p in sorted(folder.iterdir()):
        if p.name == _MANIFEST or _is_temp(p):
            continue
        m = _CHUNK_NAME.fullmatch(p.name)
        try:
            if m is None or int(m.group(1)) >= len(bounds):
                raise FileFormatError(f"{p.name}: not a chunk of this run")
            probe.read(int(m.group(1)))
        except (OSError, ValueError) as bad:
            raise DamagedManifestError(
                f"{err}; {folder} also holds {p.name}, which is not a complete "
                f"chunk of this run ({bad}): pass restart=True (payne-lite fit "
                "--restart) to discard the folder"
            ) from err
        n_ours += 1
    if not n_ours:  # nothing to keep: the file may be someone else's
        raise DamagedManifestError(
            f"{err}; {folder} holds no chunk file to resume from: pass restart=True "
            "(payne-lite fit --restart) to discard the folder"
        ) from err
    warnings.warn(
        f"{err}; every chunk file in {folder} is a complete chunk of this run: "
        "the manifest is written again and the run resumes",
        RuntimeWarning,
        stacklevel=4,
    )


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
                try:
                    read_manifest(manifest)  # only ever delete a parts folder
                except DamagedManifestError:
                    _check_only_parts(folder)  # ... or one that holds only parts
                shutil.rmtree(folder)
            else:
                try:
                    old = read_manifest(manifest)
                except DamagedManifestError as err:
                    _check_all_ours(folder, identity, bounds, err)
                    old = {"identity": identity}  # rebuilt below
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
        man["sha256"] = manifest_sha256(man)
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
