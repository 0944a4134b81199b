"""fit_catalog: fit every spectrum of a catalog, chunk by chunk, resumably.

``fit_catalog(path_in, path_out, emulator, ...)`` streams a catalog in chunks of rows,
fits every chunk with :func:`payne_lite.fit` (in this process, or on Dask workers with
``client=``; see :mod:`payne_lite.catalog`) and writes one results table; only one
chunk of spectra is in memory at a time (a few per worker with Dask). Each chunk's
results are kept in ``<path_out>.parts/`` as they are made, so a killed run resumes
where it stopped (see :func:`fit_catalog`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import time
import warnings
from pathlib import Path

import numpy as np

from .._api import fit
from .._validate import warn_if_near_grid
from ..errors import (
    ErrorModelWarning,
    KilledWorkerError,
    SchedulerLostError,
    WavelengthGridWarning,
)
from ..fitting import METHODS as POINT_METHODS
from ..fitting._gls import warn_small_basis
from ..observe import Instrument
from ..options import options_for
from ._apogee import DEFAULT_CHUNK_SIZE, check_chunk_size, chunk_bounds
from ._groups import check_star_grids, pad_chunk, star_chunks, visit_table
from ._hdf5 import CatalogChunk, Reader
from ._lock import OutputLock
from ._parts import Parts, parts_folder, run_identity
from ._readers import open_catalog
from ._wavegrids import scan_grids

_log = logging.getLogger("payne_lite.catalog")  # one logger per stage

#: fit() arguments that fit_catalog sets itself.
_RESERVED = ("wavelength", "return_model", "progress")


def _check_fit_options(method: str, fit_kwargs: dict) -> None:
    """Bind the options to :func:`payne_lite.fit`'s signature and check the method's
    options object, before a catalog is opened or any work starts."""
    names = set(inspect.signature(fit).parameters) - {"flux", "flux_err", "emulator"}
    unknown = sorted(set(fit_kwargs) - names)
    if unknown:
        raise TypeError(
            f"fit_catalog: unknown fit option(s) {unknown}; payne_lite.fit takes "
            f"{sorted(names - set(_RESERVED) - {'mask', 'p0', 'method', 'mdn'})} "
            "(method settings such as max_iter go in options=payne_lite.LMOptions(...))"
        )
    options_for(method, fit_kwargs.get("options"))
    instrument = fit_kwargs.get("instrument")
    if instrument is not None and not isinstance(instrument, Instrument):
        raise TypeError(
            f"instrument must be a payne_lite.Instrument, got {type(instrument).__name__}"
        )
    if instrument is not None and instrument.per_star:
        raise ValueError(
            "a per-star (n, P) resolution or lsf_sigma is not through fit_catalog: "
            "its rows would have to follow the chunks; fit those spectra with "
            "payne_lite.fit"
        )


def _check_group(group, method: str, fit_kwargs: dict):
    """fit_catalog's ``group`` before any file is opened: None (or False), True
    (the catalog's ``group`` dataset) or a 1-D array of star ids (its length is
    checked against the catalog's once open). Point fits only, as in
    :func:`payne_lite.fit`, and no fixed rv."""
    if group is None or group is False:
        return None
    if method not in POINT_METHODS:  # the words of fit's own refusal
        raise ValueError(
            f"method={method!r}: group is a point-fit argument (lm, curve_fit); the "
            "samplers start from their own LM fit"
        )
    if "rv" in (fit_kwargs.get("fixed") or {}):
        raise ValueError("group=: each visit has its own rv; rv cannot be fixed")
    if group is True:
        return True
    ids = np.asarray(group)
    if ids.ndim != 1:
        raise ValueError(
            "group must be True (the catalog's group ids) or an (n,) array of star "
            f"ids, one per catalog row; got shape {ids.shape}"
        )
    return ids


@contextlib.contextmanager
def _grouped(cat: Reader, group):
    """``cat`` as stars of visits for ``group=True`` (:meth:`Reader.grouped`: an
    apStar file's visits), closed here when it is a reader of its own."""
    grouped = cat.grouped() if group is True else cat
    try:
        yield grouped
    finally:
        if grouped is not cat:
            grouped.close()


def _star_chunks(cat, group, p0, chunk_size: int):
    """The :class:`StarChunks` of a joint fit of ``cat``'s visits: by the catalog's
    ``group`` (``group`` True) or the given ids; refuses a (n, L) ``p0``."""
    if p0 is not None and np.ndim(p0) == 2:
        raise ValueError(
            f"group=: p0 must be one label vector (L,) for every star, got "
            f"{np.shape(p0)}"
        )
    if group is True:
        if not cat.has_group:
            raise ValueError(
                f"group=True: {cat.source} holds no group ids (the star of each "
                "spectrum: payne_lite.write_catalog(..., group=ids)); pass them as "
                "group=<(n,) array>"
            )
        group = cat.read_group()
    return star_chunks(group, len(cat), chunk_size, where=cat.source)


def fit_rows(
    chunk: CatalogChunk, emulator, *, wavelength, mask, p0, fit_kwargs, group=False
):
    """Fit one chunk of rows: a results Table (with ``id`` if the chunk has ids).

    Depends only on the rows and the settings (fit's rows do not depend on the batch
    they share or on threads), so a chunk fitted again, after a restart or on another
    worker, gives the same rows. ``p0`` is None, (L,) or this chunk's (m, L). The
    chunk's own grids (``chunk.wavelength``, one per row) replace ``wavelength``
    when it has them; the ``grid_group`` that fit then numbers per chunk is made
    catalog-wide by :func:`fit_catalog`.

    ``group`` True: joint fits of the visits of each star (``fit(...,
    group=chunk.group)``; the chunk holds whole stars, read with
    :meth:`Reader.read_rows`): one row per star, ``visit_rows`` catalog rows and
    ``id`` (n_star, V) the ids of the visits (:func:`visit_table`).
    """
    if chunk.wavelength is not None:
        wavelength = chunk.wavelength
    m = chunk.mask
    if mask is not None:
        m = mask if m is None else (m | mask[None, :])
    with warnings.catch_warnings():  # fit_catalog warned once for the catalog
        warnings.simplefilter("ignore", WavelengthGridWarning)
        warnings.simplefilter("ignore", ErrorModelWarning)
        table = fit(
            chunk.flux,
            chunk.flux_err,
            emulator,
            mask=m,
            wavelength=wavelength,
            p0=p0,
            progress=False,
            **({"group": chunk.group} if group else {}),
            **fit_kwargs,
        )
    if group:
        return visit_table(table, chunk)
    if chunk.ids is not None:
        table.add_column(chunk.ids, name="id", index=0)
    return table


def _chunk_p0(p0, start: int, stop: int):
    return p0[start:stop] if p0 is not None and np.ndim(p0) == 2 else p0


def fit_catalog(
    path_in,
    path_out: str | os.PathLike,
    emulator,
    *,
    mdn=None,
    method: str = "lm",
    client=None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    mask=None,
    p0=None,
    group=None,
    overwrite: bool = False,
    restart: bool = False,
    keep_parts: bool = False,
    progress: bool = True,
    meta: dict | None = None,
    **fit_kwargs,
):
    """Fit every spectrum of a catalog, chunk by chunk, resumably; write one table.

    The catalog is read ``chunk_size`` rows at a time; each chunk is fitted with
    :func:`payne_lite.fit` (same model, starts and flags), in this process or on the
    workers of a Dask ``client``. A row's results depend only on that row and the
    settings, so the output is the same, number for number, however it was run.

    **Resume.** Each chunk's results are written, as soon as they exist, to the parts
    folder ``<path_out>.parts/`` (``chunk-000000.h5``, ... and ``manifest.json``;
    :func:`parts_folder`). Every write is atomic (a temporary file, then a rename), so
    a run killed at any point (Ctrl-C, a killed process or worker, a crash) leaves
    only complete chunk files. The same call (or ``payne-lite fit`` command) run again
    fits only the chunks that are missing; the final file is assembled from the
    chunk files in input order (each input row exactly once) and written atomically,
    then the parts folder is deleted (``keep_parts=True`` keeps it). The manifest
    records the run's identity: the catalog (resolved file paths, sizes and
    modification times, row count, wavelength grid or every row's grid), sha256
    digests of the emulator and MDN weights, ``method``, ``chunk_size``, ``mask``,
    ``p0``, the grouping and the other fit options; a resume whose identity differs
    is refused (``ValueError`` naming what differs) rather than mixing results.
    ``options.n_threads``, ``client``, ``progress``, ``meta``, ``overwrite`` and
    ``keep_parts`` may change between runs.

    **Dask.** With ``client`` (a ``distributed.Client``; see
    :func:`payne_lite.catalog.local_client`), the emulator, MDN and settings are
    sent to every worker once (a worker plugin), chunks are read here and sent to the workers (at
    most two per worker in flight, so memory stays bounded), and results come back
    here to be written; workers need neither the catalog nor the output folder. A
    worker keeps its compiled solver: chunks of one shape compile once per worker.

    **One grid per spectrum.** A catalog written with a (n, P) ``wavelength``
    (:func:`write_catalog`) is fitted chunk by chunk with each chunk's grids, as
    :func:`payne_lite.fit` fits ``wavelength=`` (n, P) (the spectra of a chunk that
    share a grid are fitted together). Before any chunk is fitted, every row's grid
    is read once, a slab of rows at a time, and checked against the emulator (and
    the MDN) as fit would, naming the row; point fits only (``"lm"``,
    ``"curve_fit"``: the samplers take one grid). The table's ``grid_group`` column
    numbers the distinct grids catalog-wide, in the order of their first rows (the
    same however the catalog is chunked), and ``meta["n_wavelength_grids"]`` counts
    them.

    **Joint fits of visits** (``group``). The visits of each star are fitted
    together, as ``payne_lite.fit(..., group=ids)`` fits them: one label vector per
    star, one rv and continuum per visit, one results row per star. ``group=True``
    takes the star of each spectrum from the catalog (its ``group`` dataset,
    :func:`write_catalog`); an (n,) array gives it, one id per catalog row. Chunks
    hold whole stars: the stars in the order of their first row, consecutive stars
    until a chunk holds ``chunk_size`` spectra (a star with more visits gets a chunk
    of its own); a chunk's rows are read wherever they are in the catalog (the
    visits of a star need not be contiguous), in catalog order, so the table is
    that of ``fit`` on the whole catalog: the stars in the order of their first row,
    ``visit_rows`` (n_star, V) catalog rows, V the most visits of any star (chunk
    tables are padded to it, :func:`payne_lite.fitting.pad_visits`), ``id``
    (n_star, V) the ids of the visits ('' after a star's last) when the catalog
    has ids. The run's identity includes a digest of the ids, so a changed grouping
    does not resume. With one grid per spectrum, a star whose visits are on two
    grids is refused before any chunk is fitted. Point fits only, ``p0`` (L,) only,
    no fixed rv (as ``fit``).

    Args:
        path_in: a catalog ``.h5`` (:func:`write_catalog`: one wavelength grid, or
            one per spectrum), one or more APOGEE FITS files, or an open reader
            (see :func:`open_catalog`).
        path_out: results file, ``.fits``, ``.ecsv`` or ``.h5`` (see
            :func:`payne_lite.write_results`; FITS gets FITS-safe column names).
        emulator: a :class:`payne_lite.Emulator`, or the path of an emulator file.
        mdn: optional :class:`payne_lite.MDN` (or the path of an MDN file) trained
            for ``emulator``: passed to :func:`payne_lite.fit` (MDN starts and
            bounds, ``<label>_mdn`` columns); the catalog must be on the emulator's
            wavelength grid.
        method: ``"lm"`` or ``"curve_fit"`` (see :func:`payne_lite.fit`).
        client: optional ``distributed.Client``; None fits in this process.
        chunk_size: spectra per chunk (read, fitted, recorded); a multiple of
            ``LMOptions.batch_size`` (128) keeps every batch full.
        mask: optional (P,) bool, True = ignore the pixel in every spectrum (for
            example known model problems); combined with the catalog's own mask.
        p0: optional starting labels [physical], (L,) for all or (n, L) per spectrum.
        group: None (one fit per spectrum), True (joint fits of the visits of each
            star by the catalog's ``group`` dataset) or an (n,) array of star ids,
            one per catalog row (any values ``numpy.unique`` can sort); see above.
        overwrite: replace an existing ``path_out`` (otherwise refused before any
            fitting starts).
        restart: discard the results of an earlier run in the parts folder and fit
            every chunk again.
        keep_parts: keep the parts folder after the final file is written.
        progress: show a tqdm progress bar over spectra.
        meta: JSON-compatible entries added to the table's meta (provenance).
        **fit_kwargs: passed to :func:`payne_lite.fit` (``instrument``,
            ``cont_deg``, ``rv_range``, ``fixed``, ``options``, ...);
            checked against its signature and ``method`` before the catalog is
            opened (a misspelled name is a ``TypeError`` naming it). Those the
            reader asks for (:meth:`~payne_lite.catalog.Reader.fit_defaults`: the
            continuum fitted for apStar files read unnormalised) are added where
            not given.

    Returns:
        The results table (also written to ``path_out``): fit's columns, preceded by
        ``id`` when the catalog has ids (``grid_group`` catalog-wide, see above;
        with ``group``, one row per star, see above); ``meta`` adds ``catalog``,
        ``n_spec``, ``n_stars`` (with ``group``), ``chunk_size``,
        ``n_chunks_resumed`` (chunks taken from an earlier run), ``n_workers`` (0
        without a client) and ``fit_seconds`` (this run).

    Raises:
        TypeError: ``client`` not a ``distributed.Client``; ``mdn`` neither an MDN
            nor a path.
        ImportError: ``client`` given but dask.distributed is not installed.
        FileExistsError: ``path_out`` exists and ``overwrite`` is False; the parts
            folder's name is taken by something else.
        payne_lite.OutputLockedError: another live run owns ``path_out`` (its lock
            file ``<path_out>.lock``, held while a run lives, names it); raised
            before anything is read, deleted (``restart``) or written. A lock left
            by a run that died is taken over with a RuntimeWarning.
        payne_lite.SchedulerLostError: the Dask scheduler of ``client`` went away
            during the run (the chunks recorded before are kept: the same call
            resumes, on another cluster or in this process). A worker that dies
            is not an error: its chunks are fitted again on the others.
        payne_lite.KilledWorkerError: the Dask workers running one chunk died each
            time it ran (distributed's ``KilledWorker``); the error names the chunk,
            the chunks recorded are kept and the same call resumes.
        FileNotFoundError, payne_lite.FileFormatError: a missing or bad catalog; an
            unreadable manifest.
        ValueError: bad settings or shapes (named in the message); a resume with
            other inputs or options; a per-spectrum grid outside the emulator's
            range (naming the row); a sampler ``method`` or a per-star (n, P)
            instrument profile; ``group=True`` for a catalog without group ids,
            ``group`` not one id per row, with a sampler, a (n, L) ``p0`` or a
            fixed rv, or a star whose visits are on two grids.
    """
    from ._results import write_results

    chunk_size, path_out = _check_call(
        client, method, chunk_size, path_out, overwrite, fit_kwargs
    )
    group = _check_group(group, method, fit_kwargs)
    emulator, mdn, fit_kwargs = _load_models(emulator, mdn, fit_kwargs)
    opts = fit_kwargs.get("options")
    if getattr(opts, "estimator", "wls") == "gls" and emulator.error_basis is not None:
        warn_small_basis(emulator)  # once for the catalog, not per chunk

    t0 = time.perf_counter()
    # one run per output: a second is refused here, before it reads, deletes
    # (restart) or writes anything of the first's
    with OutputLock(path_out), _resume_hint(path_out):
        _check_output(path_out, overwrite)  # again: a run that just finished
        # a reader passed in stays open for its owner; paths are opened and closed here
        opened = (
            contextlib.nullcontext(path_in)
            if isinstance(path_in, Reader)
            else open_catalog(path_in)
        )
        with opened as cat, _grouped(cat, group) as cat:
            # what the reader's spectra need (a continuum left to the fit): the
            # caller's own keywords win
            fit_kwargs = {**cat.fit_defaults(), **fit_kwargs}
            n = len(cat)
            wavelength, mask = _check_catalog(cat, emulator, mask, p0)
            stars = None if group is None else _star_chunks(cat, group, p0, chunk_size)
            grids = None
            if cat.per_row_wavelength:  # every grid checked before any chunk is fitted
                grids = _scan_row_grids(cat, emulator, method, fit_kwargs)
                if stars is not None:
                    check_star_grids(stars, grids.group, cat.source)
            bounds = chunk_bounds(n, chunk_size) if stars is None else stars.bounds
            identity = run_identity(
                cat,
                emulator,
                mdn=mdn,
                method=method,
                chunk_size=chunk_size,
                mask=mask,
                p0=p0,
                fit_kwargs=fit_kwargs,
                grids=grids,
                group=None if stars is None else stars.sha256,
            )
            parts = Parts.open(path_out, identity, bounds, restart=restart)
            todo = parts.missing()
            n_resumed = len(bounds) - len(todo)
            if n_resumed:
                _log.info(
                    "%s: resuming, %d of %d chunks done",
                    parts.folder,
                    n_resumed,
                    len(bounds),
                )
            settings = {
                "emulator": emulator,
                "wavelength": wavelength,
                "mask": mask,
                "fit_kwargs": {"method": method, **fit_kwargs},
                **({} if stars is None else {"group": True}),
            }
            n_workers = _fit_missing(
                cat,
                parts,
                todo,
                settings,
                p0=p0,
                grids=grids,
                stars=stars,
                client=client,
                progress=progress,
            )
            source = cat.source
            provenance = cat.provenance()
            tables = [parts.read(i) for i in range(len(bounds))]
        table = _stack(tables)
        seconds = time.perf_counter() - t0
        table.meta.update(
            catalog=source,
            n_spec=n,
            **({} if stars is None else {"n_stars": stars.n_stars}),
            chunk_size=chunk_size,
            n_chunks_resumed=n_resumed,
            n_workers=n_workers,
            fit_seconds=round(seconds, 3),
        )
        table.meta.update(provenance)
        table.meta.update(meta or {})
        write_results(table, path_out, overwrite=overwrite)
        if not keep_parts:
            parts.remove()
        return table


@contextlib.contextmanager
def _resume_hint(path_out: Path):
    """A full disk (or quota, or file-size limit) while fit_catalog writes, or a Dask
    scheduler that went away: the error says what is kept and how to go on."""
    from ._results import DISK_FULL

    try:
        yield
    except OSError as err:
        if err.errno not in DISK_FULL:
            raise
        new = OSError(
            err.errno,
            f"{err.strerror}. {_kept(path_out)}: free some space and run the same "
            "command again to resume",
        )
        new.filename = err.filename
        raise new from err
    except SchedulerLostError as err:
        raise SchedulerLostError(
            f"{err}. {_kept(path_out)}: run the same command again to resume (with "
            "a scheduler that is up, other workers, or none to fit in this process)"
        ) from err
    except KilledWorkerError as err:
        raise KilledWorkerError(
            f"{err}. {_kept(path_out)}: run the same command again to resume from them",
            chunk=err.chunk,
            rows=err.rows,
        ) from err


def _kept(path_out: Path) -> str:
    """'N finished chunk(s) are kept in <parts folder>'."""
    folder = parts_folder(path_out)
    n_kept = len(list(folder.glob("chunk-*.h5"))) if folder.is_dir() else 0
    return f"{n_kept} finished chunk(s) are kept in {folder}"


def _check_call(client, method, chunk_size, path_out, overwrite, fit_kwargs):
    """fit_catalog's settings checked before any file is opened: the client, the
    fit options, ``chunk_size`` and ``path_out``. Returns ``(chunk_size, path_out)``
    as int and Path."""
    from ._results import format_of

    if client is not None:
        from ._distributed import check_client

        check_client(client)
    reserved = sorted(set(fit_kwargs) & set(_RESERVED))
    if reserved:
        raise ValueError(
            f"fit_catalog sets {reserved} itself (the catalog's wavelength; no model "
            "spectra, which would not fit in memory for a catalog; its own progress "
            "bar); do not pass them"
        )
    _check_fit_options(method, fit_kwargs)
    chunk_size = check_chunk_size(chunk_size)
    path_out = Path(path_out)
    format_of(path_out)  # unknown suffix: refused before any work
    if not path_out.parent.is_dir():
        raise FileNotFoundError(f"folder {path_out.parent} does not exist")
    _check_output(path_out, overwrite)
    return chunk_size, path_out


def _check_output(path_out: Path, overwrite: bool) -> None:
    """An existing ``path_out`` is refused without ``overwrite``."""
    if path_out.exists() and not overwrite:
        parts = parts_folder(path_out)
        raise FileExistsError(
            f"{path_out} exists; pass overwrite=True to replace it"
            + (
                f" ({parts} is also there: kept, or left by a run stopped after "
                "its final write; overwrite=True rebuilds the file from it)"
                if parts.is_dir()
                else ""
            )
        )


def _load_models(emulator, mdn, fit_kwargs):
    """``(emulator, mdn, fit_kwargs)`` with paths loaded and the MDN checked against
    the emulator; an MDN is added to the fit options as ``mdn``."""
    from ..emulator import Emulator

    if isinstance(emulator, str | os.PathLike):
        emulator = Emulator.load(emulator)
    if mdn is not None:
        from ..mdn import MDN

        if isinstance(mdn, str | os.PathLike):
            mdn = MDN.load(mdn, emulator=emulator)
        elif not isinstance(mdn, MDN):
            raise TypeError(
                f"mdn must be a payne_lite.MDN or the path of an MDN file, got "
                f"{type(mdn).__name__}"
            )
        else:
            mdn.check_emulator(emulator)
        fit_kwargs = {**fit_kwargs, "mdn": mdn}
    return emulator, mdn, fit_kwargs


def _check_catalog(cat, emulator, mask, p0):
    """Check the settings that depend on the open catalog ``cat``; returns the
    wavelength to pass to fit (None when the catalog is on the emulator's grid or
    has one grid per spectrum, which come with its chunks) and ``mask`` as a (P,)
    bool array (or None). Warns once if the grids nearly agree."""
    n, n_pix = len(cat), cat.n_pix
    wave = cat.wavelength
    same = wave is None or (
        wave.shape == emulator.wavelength.shape
        and np.array_equal(wave, emulator.wavelength)
    )
    wavelength = None if same else wave
    if wavelength is not None:  # once here; the chunks' fits do not repeat it
        warn_if_near_grid(
            wave,
            emulator.wavelength,
            name=f"{cat.source}: wavelength",
            hint="write the catalog with the emulator's grid if they are on it",
        )
    if mask is not None:
        mask = np.asarray(mask)
        if mask.dtype != bool or mask.shape != (n_pix,):
            raise ValueError(
                f"mask must be a bool array ({n_pix},) over the catalog's "
                f"pixels, got {mask.dtype} {mask.shape}"
            )
    if p0 is not None and np.ndim(p0) == 2 and np.shape(p0)[0] != n:
        raise ValueError(
            f"p0 {np.shape(p0)} must be ({emulator.n_labels},) or "
            f"({n}, {emulator.n_labels}) for the catalog's {n} spectra"
        )
    if p0 is not None:  # every row, before any chunk is fitted
        emulator.check_labels(p0, name="p0")
    return wavelength, mask


def _scan_row_grids(cat, emulator, method, fit_kwargs):
    """:func:`scan_grids` of a catalog with one grid per spectrum, for ``method``
    (a point fit: the samplers take one grid)."""
    if method not in POINT_METHODS:
        raise ValueError(
            f"method={method!r}: the samplers take one wavelength grid (P,); "
            f"{cat.source} has one grid per spectrum: fit it with "
            f"{' or '.join(map(repr, POINT_METHODS))}"
        )
    _log.info("%s: checking the wavelength grid of every spectrum", cat.source)
    grids = scan_grids(
        cat,
        emulator,
        instrument=fit_kwargs.get("instrument"),
        mdn=fit_kwargs.get("mdn"),
    )
    _log.info("%s: %d distinct wavelength grids", cat.source, grids.n_grids)
    return grids


def _catalog_grid_groups(table, grids, start: int, stop: int):
    """``table`` (rows ``start:stop``, or a joint fit's stars) with fit's per-chunk
    ``grid_group`` replaced by the catalog-wide index of each row's (each star's)
    grid."""
    col = table["grid_group"]
    if "visit_rows" in table.colnames:  # a star's visits share its grid
        table["grid_group"] = grids.group[np.asarray(table["visit_rows"])[:, 0]]
    else:
        table["grid_group"] = grids.group[start:stop]
    table["grid_group"].description = (
        f"index of the {'star' if 'visit_rows' in table.colnames else 'spectrum'}'s "
        "distinct wavelength grid in the catalog (in the order of the grids' first "
        "rows)"
    )
    table["grid_group"].unit = col.unit
    table.meta["n_wavelength_grids"] = grids.n_grids
    return table


def _fit_missing(
    cat, parts, todo, settings, *, p0, grids, stars, client, progress
) -> int:
    """Fit chunks ``todo`` of ``cat`` (here, or on the workers of ``client``) and
    record each in ``parts`` as it arrives; returns the number of workers (0 here).
    With ``grids`` (a catalog with one grid per spectrum), each chunk's
    ``grid_group`` is renumbered catalog-wide before it is recorded. With ``stars``
    (joint fits of visits: ``parts.bounds`` are ranges of stars), each chunk is
    read by its stars' rows and its table padded to the catalog's most visits.

    A run that fails before any chunk is recorded removes the parts folder it
    created (nothing to resume from)."""
    bounds = parts.bounds
    n = len(cat)
    if stars is None:

        def read(i):
            return cat.read(*bounds[i])

        def n_rows(i):
            return bounds[i][1] - bounds[i][0]

    else:

        def read(i):
            return stars.read(cat, i)

        n_rows = stars.n_rows
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n,
            initial=n - sum(n_rows(i) for i in todo),
            desc="fit_catalog",
            unit="spec",
            smoothing=0.1,
        )

    def record(i, table):
        if stars is not None:
            table = pad_chunk(table, stars.n_visits_max)
        if grids is not None:
            table = _catalog_grid_groups(table, grids, *bounds[i])
        parts.write(i, table)
        if bar is not None:
            bar.update(n_rows(i))

    n_workers = 0
    try:
        if client is None:
            for i in todo:
                start, stop = bounds[i]
                table = fit_rows(read(i), p0=_chunk_p0(p0, start, stop), **settings)
                record(i, table)
        else:
            from ._distributed import fit_chunks

            n_workers = fit_chunks(
                client,
                cat,
                bounds,
                todo,
                settings,
                task=fit_rows,
                p0_of=lambda start, stop: _chunk_p0(p0, start, stop),
                record=record,
                read=None if stars is None else read,  # None: chunks are row slices
            )
    except BaseException:
        if parts.created and not parts.done:
            parts.remove()  # nothing of this run to resume from
        raise
    finally:
        if bar is not None:
            bar.close()
    return n_workers


def _stack(tables):
    """One table from the per-chunk tables (same columns; meta of the first, with
    the chunks' ``rv_rescanned`` summed)."""
    from astropy.table import vstack

    if len(tables) == 1:
        return tables[0]
    meta = dict(tables[0].meta)
    if all("rv_rescanned" in t.meta for t in tables):
        meta["rv_rescanned"] = int(sum(t.meta["rv_rescanned"] for t in tables))
    for t in tables:
        t.meta.clear()
    out = vstack(tables, join_type="exact")
    out.meta.update(meta)
    return out
