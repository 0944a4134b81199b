"""Shared helpers for payne_lite's versioned, self-describing HDF5 files.

Every file carries ``attrs["format"]`` (what it holds) and ``attrs["format_version"]``.
Datasets are written with HDF5's Fletcher-32 checksum filter, so a corrupted chunk is
detected on read instead of yielding wrong numbers.

The whole file is covered too, HDF5's own metadata (headers, attributes) included: it
starts with a 512-byte user block (which the HDF5 library skips) holding
:data:`MAGIC` and the SHA-256 of the rest of the file. :func:`check_stamp` verifies
it before the HDF5 library reads a byte, because libhdf5 can abort the process
("corrupted double-linked list") or hang on a damaged header. Files written before
the stamp (the HDF5 signature at byte 0) are read without it; anything else is
refused. Catalogs, which can be many GB, have no stamp: they are covered by HDF5's
own metadata checksums (:data:`CHECKSUMMED_LIBVER`) and their own (see
:mod:`payne_lite.catalog._hdf5`). Writes are atomic: a temporary file in the target
folder is renamed over the target once complete and stamped.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from .errors import FileFormatError

#: Size of the user block in front of the HDF5 data, and what it starts with.
USERBLOCK = 512
MAGIC = b"payne_lite sha256="
_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_STAMP_LEN = len(MAGIC) + 64 + 1
#: HDF5 file-format bounds under which every metadata structure the library writes
#: (superblock 3, object headers 2 with their attributes, the chunk indexes of
#: resizable datasets) carries a checksum that the library verifies on read. Files
#: written so need HDF5 >= 1.10 to be read.
CHECKSUMMED_LIBVER = ("v110", "latest")


def _sha256_after_userblock(fh) -> str:
    import hashlib

    fh.seek(USERBLOCK)
    h = hashlib.sha256()
    while block := fh.read(1 << 20):
        h.update(block)
    return h.hexdigest()


def stamp(fh) -> None:
    """Write :data:`MAGIC` and the SHA-256 of everything after the user block into
    the user block of the HDF5 file open in ``fh`` (binary, read-write, seekable;
    written with ``userblock_size=USERBLOCK`` and closed by h5py)."""
    digest = _sha256_after_userblock(fh)
    fh.seek(0)
    fh.write(MAGIC + digest.encode() + b"\n")


def looks_stamped(path: str | os.PathLike) -> bool:
    """Whether the file starts with :data:`MAGIC` (for code that sniffs any file)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def check_stamp(path: str | os.PathLike) -> bool:
    """Verify the stamp of a payne_lite HDF5 file before anything opens it.

    Returns True for a stamped file that matches, False for a file written before
    stamps (the HDF5 signature at byte 0: not checked).

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: a stamp that does not match (damaged, truncated), or
            neither a stamp nor the HDF5 signature at the start.
    """
    with open(path, "rb") as fh:
        head = fh.read(USERBLOCK)
        if head.startswith(_SIGNATURE):
            return False
        if not head.startswith(MAGIC) or len(head) < _STAMP_LEN:
            raise FileFormatError(
                f"{path}: not a readable HDF5 file (corrupt or truncated?): neither "
                "payne_lite's checksum block nor the HDF5 signature at its start"
            )
        want = head[len(MAGIC) : len(MAGIC) + 64].decode("ascii", "replace")
        if _sha256_after_userblock(fh) != want:
            raise FileFormatError(
                f"{path}: corrupt or truncated: its bytes do not match the checksum "
                "written with it"
            )
    return True


def write_dataset(group: h5py.Group, name: str, data, *, compress: bool = True) -> None:
    arr = np.asarray(data)
    if arr.ndim == 0 or arr.size < 2:
        group.create_dataset(name, data=arr)
        return
    kw = dict(fletcher32=True, chunks=True)
    if compress:
        kw.update(compression="gzip", compression_opts=4, shuffle=True)
    group.create_dataset(name, data=arr, **kw)


def set_json_attr(obj, name: str, value) -> None:
    obj.attrs[name] = json.dumps(value)


def get_json_attr(obj, name: str, path):
    try:
        return json.loads(obj.attrs[name])
    except KeyError as err:
        raise FileFormatError(f"{path}: missing attribute {name!r}") from err
    except (TypeError, ValueError) as err:
        raise FileFormatError(f"{path}: attribute {name!r} is not valid JSON") from err


@contextlib.contextmanager
def atomic_h5_writer(
    path: str | os.PathLike,
    fmt: str,
    version: int,
    *,
    stamped: bool = True,
    libver: tuple[str, str] | None = None,
) -> Iterator[h5py.File]:
    """Open a temporary HDF5 file next to ``path``; rename it over ``path`` on success.

    ``stamped``: the file gets its checksum block (:func:`stamp`). Catalogs do not:
    they can be many GB (a whole-file hash at every open); they are written with
    ``libver`` :data:`CHECKSUMMED_LIBVER` instead, whose HDF5 metadata carries the
    library's own checksums, and Fletcher-32 on their datasets.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        ub = USERBLOCK if stamped else 0
        with h5py.File(tmp, "w", userblock_size=ub, libver=libver) as f:
            f.attrs["format"] = fmt
            f.attrs["format_version"] = version
            f.attrs["creator"] = "payne_lite"
            yield f
        if stamped:
            with open(tmp, "r+b") as fh:
                stamp(fh)
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def open_checked(
    path: str | os.PathLike, fmt: str, versions: tuple[int, ...]
) -> Iterator[h5py.File]:
    """Open ``path`` read-only and refuse it unless it is a ``fmt`` file of a known version.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not HDF5, corrupt/truncated, another kind of file, another version.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    check_stamp(path)
    try:
        f = h5py.File(path, "r")
    except (OSError, KeyError, RuntimeError) as err:
        raise FileFormatError(
            f"{path}: not a readable HDF5 file (corrupt or truncated?): {err}"
        ) from err
    with f:
        try:
            got = f.attrs.get("format")
            ver = f.attrs.get("format_version")
        except (OSError, KeyError, RuntimeError) as err:
            raise FileFormatError(f"{path}: unreadable attributes ({err})") from err
        if isinstance(got, bytes):
            got = got.decode()
        if got != fmt:
            raise FileFormatError(
                f"{path}: expected a {fmt!r} file, found format={got!r}"
            )
        if ver is None or int(ver) not in versions:
            ver = None if ver is None else int(ver)
            raise FileFormatError(
                f"{path}: {fmt} format_version={ver!r} is not supported "
                f"(this payne_lite reads {list(versions)})"
            )
        try:
            yield f
        except (OSError, KeyError, RuntimeError) as err:
            # OSError: a dataset chunk failed its fletcher32 checksum or could not be
            # read; KeyError/RuntimeError: h5py's report of a damaged object header.
            raise FileFormatError(f"{path}: corrupt data ({err})") from err


def read_dataset(f: h5py.File, name: str, path) -> np.ndarray:
    if name not in f:
        raise FileFormatError(f"{path}: missing dataset {name!r}")
    try:
        return f[name][()]
    except (OSError, KeyError, RuntimeError) as err:
        raise FileFormatError(f"{path}: dataset {name!r} is corrupt ({err})") from err


def read_npz(path, required: tuple[str, ...], what: str) -> dict[str, np.ndarray]:
    """All arrays of a ``.npz`` file, refusing it unless it has the ``required`` keys.

    Raises:
        FileNotFoundError: no such file.
        FileFormatError: not a readable ``.npz``, or a required key is missing.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        with np.load(path) as d:
            data = {k: d[k] for k in d.files}
    except (OSError, ValueError) as err:
        raise FileFormatError(f"{path}: not a readable .npz file: {err}") from err
    missing = [k for k in required if k not in data]
    if missing:
        raise FileFormatError(
            f"{path}: not {what}, missing key(s) {missing}; found {sorted(data)}"
        )
    return data
