"""Fit catalogs on a Dask distributed cluster (optional: ``pip install payne-lite[dask]``).

:func:`payne_lite.fit_catalog` with ``client=`` calls :func:`fit_chunks`; the
``payne-lite fit`` command gets its client from :func:`connect` (``--scheduler
ADDRESS`` for a running cluster, ``--workers N`` for a :func:`local_client`).

How the work is shared:

* the emulator, the MDN and the fit settings travel once to every worker as a
  worker plugin (:class:`._dask_plugin.Settings`); every task uses that worker's one copy, so a
  worker deserialises the emulator once and keeps its device arrays and compiled
  solver (chunks of one shape compile once per worker). A plugin, not a scattered
  future: Dask's active memory manager drops replicas of scattered data that no
  queued task on a worker needs at that moment, and the worker then fetched the
  emulator again (2 copies in 7 tasks, seen under load); a worker that joins later,
  or replaces a dead one, gets the plugin from the scheduler before its first task;
* the catalog is read here, one chunk at a time, and each chunk is sent to the
  cluster with its task; at most two chunks per worker thread are in flight, so
  memory stays bounded however large the catalog. Workers need no shared file system:
  they neither read the catalog nor write results;
* each finished chunk's table comes back here and is recorded at once (the caller's
  ``record``: fit_catalog writes it to its parts folder), in whatever order chunks
  finish; the final table is assembled in input order by the caller.

A worker that dies loses only its tasks in flight: the scheduler runs them again on
another worker, and a chunk whose data died with it (scattered data cannot be
recomputed) is read and sent again from here. A scheduler that goes away stops the
run with :class:`payne_lite.SchedulerLostError`; as when this process dies, the
chunks already recorded are kept (see fit_catalog's resume). A chunk whose workers
die every time it runs (distributed's ``KilledWorker``, after
``distributed.scheduler.allowed-failures`` deaths) stops the run with
:class:`payne_lite.KilledWorkerError`, which names the chunk; the chunks recorded
are kept too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError

from ..errors import KilledWorkerError, SchedulerLostError

_log = logging.getLogger("payne_lite.catalog")  # one logger per stage

#: JAX's monitoring event for one XLA backend compilation (jax._src.dispatch).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
#: Per-process counters, read by :func:`worker_stats` (for tests and diagnostics).
_STATS: dict = {"tasks": 0, "compiles": 0, "compiles_per_task": [], "settings": set()}
_STATS_LOCK = threading.Lock()
_listening = False


def require():
    """The ``distributed`` module; ImportError with the install command if absent."""
    try:
        import distributed
    except ImportError as err:
        raise ImportError(
            "Dask-distributed catalog fitting needs dask.distributed: pip install "
            "'payne-lite[dask]' (or 'dask[distributed]')"
        ) from err
    return distributed


def check_client(client) -> None:
    """Raise TypeError unless ``client`` is a ``distributed.Client``."""
    distributed = require()
    if not isinstance(client, distributed.Client):
        raise TypeError(
            f"client must be a distributed.Client (or None to fit in this process), "
            f"got {type(client).__name__}"
        )


@contextlib.contextmanager
def local_client(n_workers: int, **cluster_kwargs) -> Iterator:
    """A ``distributed.Client`` on a ``LocalCluster`` of ``n_workers`` processes.

    Each worker process runs one task at a time (``threads_per_worker=1``); a task's
    :func:`payne_lite.fit` fits its batches in threads of its own (``n_threads``).
    No dashboard is started. The cluster is shut down when the block ends.

    Args:
        n_workers: worker processes (>= 1).
        **cluster_kwargs: passed to ``distributed.LocalCluster`` (for example
            ``memory_limit``).
    """
    distributed = require()
    if isinstance(n_workers, bool) or int(n_workers) != n_workers or n_workers < 1:
        raise ValueError(f"n_workers must be a positive int, got {n_workers!r}")
    kw = {
        "n_workers": int(n_workers),
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        # the scheduler's HTTP server (health checks) on a free port, not 8787: a
        # second cluster in one process would warn that 8787 is taken
        "scheduler_kwargs": {"dashboard": False, "dashboard_address": ":0"},
        "silence_logs": logging.ERROR,
        **cluster_kwargs,
    }
    with distributed.LocalCluster(**kw) as cluster, distributed.Client(cluster) as c:
        yield c


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None) -> Iterator:
    """The client for ``payne-lite fit``: None (this process), a scheduler's, or local.

    Args:
        scheduler: address of a running scheduler (``tcp://host:8786``); its workers
            are used as they are.
        workers: with no scheduler, start a :func:`local_client` of this many
            worker processes.

    Raises:
        ValueError: both given, or ``workers`` < 1.
        ImportError: dask.distributed is not installed.
    """
    if scheduler is not None and workers is not None:
        raise ValueError(
            "give --scheduler or --workers, not both (a scheduler has its own workers)"
        )
    if scheduler is not None:
        distributed = require()
        c = distributed.Client(scheduler)
        try:
            yield c
        finally:
            _close_quietly(c)
    elif workers is not None:
        with local_client(workers) as c:
            yield c
    else:
        yield None


def _close_quietly(client) -> None:
    """Close ``client``; if its scheduler went away, without the errors distributed
    logs when a client is closed while it tries to reconnect (the run has already
    said what happened, in one line)."""
    if client.status == "running":
        client.close()
        return
    logger = logging.getLogger("distributed.client")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        client.close()
    finally:
        logger.setLevel(level)


def _on_event(event: str, *args, **kwargs) -> None:
    if event == _COMPILE_EVENT:
        with _STATS_LOCK:
            _STATS["compiles"] += 1


def _listen() -> None:
    global _listening
    with _STATS_LOCK:
        if _listening:
            return
        _listening = True
    import jax

    jax.monitoring.register_event_duration_secs_listener(_on_event)


def _worker_settings(name: str) -> dict:
    distributed = require()
    plugin = distributed.get_worker().plugins.get(name)
    if plugin is None or plugin.settings is None:
        raise RuntimeError(
            f"worker has no plugin {name!r}: the run's settings are gone"
        )
    return plugin.settings


#: The scheduler's event topic on which each task says it started and ended
#: (``"start <key>"``, ``"end <key>"``): a chunk lost with a worker is blamed for
#: the death only if it was running there.
_RUNNING_TOPIC = "payne-lite-chunk-running"


def _fit_task(task: Callable, chunk, settings_name: str, p0):
    """Run on a worker: ``task(chunk, p0=p0, **settings)`` with the worker's copy of
    the run's settings (plugin ``settings_name``)."""
    _listen()
    worker = require().get_worker()
    key = str(worker.get_current_task())
    worker.log_event(_RUNNING_TOPIC, f"start {key}")  # see fit_chunks
    settings = _worker_settings(settings_name)
    before = _STATS["compiles"]
    table = task(chunk, p0=p0, **settings)
    worker.log_event(_RUNNING_TOPIC, f"end {key}")
    with _STATS_LOCK:
        _STATS["tasks"] += 1
        _STATS["compiles_per_task"].append(_STATS["compiles"] - before)
        _STATS["settings"].add(id(settings.get("emulator")))
    return table


def worker_stats() -> dict:
    """This process's counters: ``pid``, ``tasks`` run, XLA ``compiles`` (since the
    first task), ``compiles_per_task`` and ``emulator_copies`` (distinct emulator
    objects the tasks got). Run it on every worker with ``client.run(worker_stats)``.
    """
    with _STATS_LOCK:
        return {
            "pid": os.getpid(),
            "tasks": _STATS["tasks"],
            "compiles": _STATS["compiles"],
            "compiles_per_task": list(_STATS["compiles_per_task"]),
            "emulator_copies": len(_STATS["settings"]),
        }


def fit_chunks(
    client,
    cat,
    bounds: list[tuple[int, int]],
    todo: list[int],
    settings: dict,
    *,
    task: Callable,
    p0_of: Callable,
    record: Callable,
    read: Callable | None = None,
) -> int:
    """Fit chunks ``todo`` of ``cat`` on ``client``'s workers; ``record(i, table)``
    each as it finishes (in completion order).

    Args:
        client: a ``distributed.Client``.
        cat: an open catalog reader (read here, a chunk at a time).
        bounds: ``[(start, stop), ...]`` of every chunk.
        todo: indices of the chunks to fit.
        settings: keyword arguments of ``task`` (the emulator among them); sent once
            to every worker (a worker plugin, removed when this returns).
        task: ``task(chunk, p0=p0, **settings) -> Table``, run on the workers (a
            module-level function, so that it pickles by name).
        p0_of: ``(start, stop) -> p0`` for a chunk (None, (L,) or (m, L)).
        record: called here with each finished chunk's index and table.
        read: ``read(i) -> CatalogChunk``, chunk ``i`` read here (for example the
            rows of some stars, :meth:`Reader.read_rows`: the chunk carries its
            rows and star ids to the worker); None reads ``cat.read(*bounds[i])``
            (``p0_of`` gets ``bounds[i]`` either way).

    Returns:
        The number of workers when the work started.

    A chunk whose worker died is fitted again elsewhere: the scheduler runs the
    task again, or, when the chunk's data died with the worker (it was scattered
    there), the chunk is read and sent again (at most :data:`MAX_RESENDS` times;
    then, or when the scheduler gives the task up, :class:`KilledWorkerError`).

    Raises:
        SchedulerLostError: the scheduler went away (closed, killed, unreachable);
            the chunks recorded before stay recorded.
        KilledWorkerError: the workers that ran a chunk died every time
            (distributed's ``KilledWorker``); the chunks recorded stay recorded.
        Whatever a task raised (the chunks not yet finished are cancelled; those
        recorded stay recorded).
    """
    distributed = require()
    n_workers = len(client.scheduler_info().get("workers", {}))
    threads = sum(client.nthreads().values()) or 1
    window = max(2, 2 * threads)
    from ._dask_plugin import Settings

    plugin = Settings(settings)
    client.register_plugin(plugin, name=plugin.name)
    run = uuid.uuid4().hex[:8]
    pending = iter(todo)
    in_flight: dict[str, tuple[int, object, object]] = {}
    resent: dict[int, int] = {}  # times each chunk was lost with a worker
    died: dict[int, int] = {}  # ... while it was running there
    done = distributed.as_completed()

    def submit(i: int) -> None:
        if client.status != "running":  # do not wait for a reconnection here
            raise CancelledError("scheduler-connection-lost")
        start, stop = bounds[i]
        chunk = cat.read(start, stop) if read is None else read(i)
        chunk_f = _scatter(client, chunk)
        fut = client.submit(
            _fit_task,
            task,
            chunk_f,
            plugin.name,
            p0_of(start, stop),
            key=f"payne-lite-chunk-{run}-{i}-{resent.get(i, 0)}",
            pure=False,
        )
        in_flight[fut.key] = (i, fut, chunk_f)
        done.add(fut)

    def rows_of(i: int) -> tuple[int, int] | None:  # a slice of the catalog, or not
        return bounds[i] if read is None else None

    def submit_next() -> None:
        i = next(pending, None)
        if i is not None:
            submit(i)

    n_recorded = 0
    try:
        for _ in range(window):
            submit_next()
        for fut in done:
            i, _, chunk_f = in_flight.pop(fut.key)
            try:
                table = fut.result()
            except distributed.KilledWorker as err:
                n = getattr(err, "allowed_failures", None)
                raise _killed(i, rows_of(i), None if n is None else n + 1, err) from err
            except CancelledError as err:
                if _scheduler_gone(client, err):
                    raise
                # the worker that held the chunk's data died (the scheduler cannot
                # recompute scattered data): read the chunk again and send it anew.
                # Counted against the chunk if it was running there (it may have
                # killed the worker), not if it only waited there (a bounded
                # number of times)
                key = fut.key
                resent[i] = resent.get(i, 0) + 1
                if _was_running(client, key):
                    died[i] = died.get(i, 0) + 1
                if died.get(i, 0) > MAX_RESENDS or resent[i] > 3 * (MAX_RESENDS + 1):
                    raise _killed(i, rows_of(i), resent[i], err) from err
                _log.warning(
                    "chunk %d was lost with a worker (%s); sending it again",
                    i,
                    getattr(err, "reason", err),
                )
                chunk_f.release()
                submit(i)
                continue
            record(i, table)
            n_recorded += 1
            fut.release()
            chunk_f.release()
            submit_next()
    except BaseException as err:
        if _scheduler_gone(client, err):
            raise SchedulerLostError(
                f"the Dask scheduler {_address(client)} went away (the connection "
                f"to it was lost) after {n_recorded} of the {len(todo)} chunk(s) "
                "this run had to fit were recorded"
            ) from err
        with contextlib.suppress(Exception):
            client.cancel([f for _, f, _ in in_flight.values()])
        raise
    finally:
        if client.status == "running":  # a scheduler that went away: nothing to undo
            with contextlib.suppress(Exception):
                client.unregister_worker_plugin(plugin.name)
    return n_workers


def _was_running(client, key) -> bool:
    """Whether the task ``key`` started and did not end (:data:`_RUNNING_TOPIC`)."""
    try:
        said = {msg for _, msg in client.get_events(_RUNNING_TOPIC)}
    except Exception:  # noqa: BLE001 - no answer: blamed, as before this check
        return True
    return f"start {key}" in said and f"end {key}" not in said


def _killed(i: int, rows, n_deaths: int | None, err) -> KilledWorkerError:
    """The package's error for chunk ``i`` (catalog rows ``rows``, or None) whose
    workers died ``n_deaths`` times (None: unknown) while they held or ran it:
    distributed's ``KilledWorker``, or the chunk's data lost more than
    :data:`MAX_RESENDS` times (``err``)."""
    times = "again and again" if n_deaths is None else f"{n_deaths} time(s)"
    where = "" if rows is None else f" (catalog rows {rows[0]}:{rows[1]})"
    return KilledWorkerError(
        f"chunk {i}{where} stopped the run: the Dask workers it was sent to died "
        f"{times} while they held or ran it ({type(err).__name__}). Workers that "
        "die on a chunk usually run out of memory (give them more, or fit smaller chunks: "
        "chunk_size / --chunk-size, with restart) or crash on its spectra (fit "
        "those rows in one process to see)",
        chunk=i,
        rows=None if rows is None else (int(rows[0]), int(rows[1])),
    )


#: Times a chunk is sent again after the worker that held it died, before giving up.
MAX_RESENDS = 3


#: Tries to scatter a chunk (the worker chosen may die meanwhile), and the pause
#: between them (seconds).
_SCATTER_TRIES, _SCATTER_PAUSE = 5, 0.5


def _scatter(client, chunk):
    """``client.scatter`` of one chunk, tried again when the worker it went to died
    or left during the transfer: a closed connection (distributed's
    ``CommClosedError``, an OSError), or the scheduler's own ``KeyError`` on that
    worker's address (its ``update_data`` after the worker was removed: seen in
    CI when the scheduler closed mid-run, before the client noticed). Either,
    with the scheduler gone, is raised for :func:`_scheduler_gone` to name."""
    for attempt in range(_SCATTER_TRIES):
        try:
            [chunk_f] = client.scatter([chunk], hash=False)
            return chunk_f
        except (OSError, KeyError) as err:
            if _scheduler_gone(client, err) or attempt == _SCATTER_TRIES - 1:
                raise
            _log.warning("sending a chunk failed (%r); sending it again", err)
    raise AssertionError("unreachable")  # pragma: no cover


def _scheduler_gone(client, err: BaseException) -> bool:
    """Whether ``err`` (raised while a run waited on ``client``) means the scheduler
    went away: its futures cancelled as "scheduler-connection-lost", or a client no
    longer running (after a closed connection, once the client has had
    ``_SCATTER_PAUSE`` s to notice, after a closed connection or a scatter's
    KeyError: the one to a worker that died is not the scheduler's)."""
    if isinstance(err, KeyboardInterrupt):
        return False
    if "scheduler-connection-lost" in (getattr(err, "reason", None), str(err)):
        return True
    if isinstance(err, OSError | KeyError) and client.status == "running":
        time.sleep(_SCATTER_PAUSE)
    return client.status != "running"


def _address(client) -> str:
    try:
        return str(client.scheduler.address)
    except Exception:  # pragma: no cover - a client without a scheduler object
        return "(address unknown)"
