"""Catalog fitting at scale: Dask workers, resume after a kill, refused resumes.

One 2,000-spectrum catalog (the small random emulator of conftest: 60 pixels, 3
labels) in chunks of 250, fitted once in this process as the reference. Every other
run must give the same file, row for row and number for number: a row's fit depends
only on the row and the settings, not on the chunk, the worker or a restart.

The Dask tests need dask.distributed (the ``dask`` extra) and skip without it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import payne_lite as pl
from payne_lite.catalog import _runner as catalog_mod  # fit_catalog finds fit_rows
from payne_lite.catalog import parts_folder

N_SPEC, N_PIX, CHUNK = 2000, 60, 250
N_CHUNKS = N_SPEC // CHUNK
#: meta entries that describe the run, not the results.
RUN_META = ("fit_seconds", "n_chunks_resumed", "n_workers", "command", "emulator_file")

needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None,
    reason="dask.distributed is not installed (pip install 'payne-lite[dask]')",
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """(catalog path, emulator path, emulator) of the 2,000-spectrum catalog."""
    from conftest import build_tiny_emulator

    emu = build_tiny_emulator(n_pix=N_PIX, n_hid=3, seed=3)
    rng = np.random.default_rng(8)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(0.15, 0.85, (N_SPEC, emu.n_labels))
    clean = emu.predict(labels).astype(np.float64)
    err = np.full_like(clean, 0.02) * rng.uniform(0.8, 1.2, clean.shape)
    flux = clean + err * rng.normal(size=clean.shape)
    mask = np.zeros(flux.shape, bool)
    mask[5, :] = True  # no usable pixel: a flagged row, not a lost one
    mask[17, 10:40] = True
    ids = np.array([f"star{i:05d}" for i in range(N_SPEC)])
    d = tmp_path_factory.mktemp("scale")
    cat = pl.write_catalog(
        d / "catalog.h5",
        flux.astype(np.float32),
        err.astype(np.float32),
        emu.wavelength,
        mask=mask,
        ids=ids,
    )
    emu.save(d / "emulator.h5")
    return cat, d / "emulator.h5", emu


@pytest.fixture(scope="module")
def reference(files, tmp_path_factory):
    """The uninterrupted single-process run, read back from its file."""
    cat, _, emu = files
    out = tmp_path_factory.mktemp("ref") / "results.fits"
    pl.fit_catalog(cat, out, emu, chunk_size=CHUNK, progress=False)
    return pl.read_results(out)


@pytest.fixture(scope="module")
def client():
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import dask

    from payne_lite.catalog import local_client

    # the active memory manager every 10 ms, not 2 s: it drops replicas of scattered
    # data that no queued task on a worker needs (the emulator arrived twice on one
    # worker in a CI run when it was scattered; it now travels as a worker plugin)
    amm = {"distributed.scheduler.active-memory-manager.interval": "10ms"}
    with dask.config.set(amm), local_client(2) as c:
        yield c


def assert_same_results(got, ref):
    """Same columns, units and rows, every number bit for bit (NaN == NaN)."""
    assert got.colnames == ref.colnames
    assert len(got) == len(ref) == N_SPEC
    assert list(got["id"]) == [f"star{i:05d}" for i in range(N_SPEC)]  # once, in order
    for name in ref.colnames:
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        assert got[name].unit == ref[name].unit, name
    strip = lambda m: {k: v for k, v in m.items() if k not in RUN_META}  # noqa: E731
    assert strip(got.meta) == strip(ref.meta)


# --- Dask ---------------------------------------------------------------------------
@needs_dask
def test_two_worker_processes_equal_one_process(files, reference, client, tmp_path):
    from payne_lite.catalog import worker_stats

    cat, _, emu = files
    before = client.run(worker_stats)
    assert len(before) == 2
    assert len({s["pid"] for s in before.values()} | {os.getpid()}) == 3
    out = tmp_path / "results.fits"
    table = pl.fit_catalog(
        cat, out, emu, chunk_size=CHUNK, progress=False, client=client
    )
    assert table.meta["n_workers"] == 2 and table.meta["n_chunks_resumed"] == 0
    assert_same_results(pl.read_results(out), reference)
    assert not parts_folder(out).exists()

    after = client.run(worker_stats)
    tasks = {w: after[w]["tasks"] - before[w]["tasks"] for w in after}
    assert sum(tasks.values()) == N_CHUNKS and min(tasks.values()) >= 1, tasks
    for w, s in after.items():
        new = s["compiles_per_task"][len(before[w]["compiles_per_task"]) :]
        # the emulator arrived once per worker (scattered), not with every task
        assert s["emulator_copies"] - before[w]["emulator_copies"] == 1, (w, s)
        # equal chunk shapes: a worker compiles in its first chunk only
        assert all(c == 0 for c in new[1:]), (w, new)


@needs_dask
def test_cli_scheduler_and_workers_options(files, reference, client, tmp_path, capsys):
    from payne_lite.cli import main

    cat, emu_path, _ = files
    out = tmp_path / "cli.fits"
    address = client.scheduler.address
    argv = ["fit", str(cat), "--emulator", str(emu_path), "-o", str(out),
            "--chunk-size", str(CHUNK), "--no-progress"]  # fmt: skip
    assert main([*argv, "--scheduler", address]) == 0
    got = pl.read_results(out)
    assert got.meta["n_workers"] == 2
    assert_same_results(got, reference)
    capsys.readouterr()
    assert main([*argv, "--force", "--scheduler", address, "--workers", "2"]) == 2
    assert "give --scheduler or --workers, not both" in capsys.readouterr().err


# --- Dask faults: a worker killed mid-chunk, the scheduler gone ----------------------
@pytest.fixture(scope="module")
def fault_clusters():
    """``get()``: a client of a 2-process LocalCluster (short connect timeouts) whose
    scheduler is up; the same one while it lives (its workers compile once), a new
    one after a test closed its scheduler."""
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    import dask

    from payne_lite.catalog import local_client

    stack = contextlib.ExitStack()
    stack.enter_context(dask.config.set({"distributed.comm.timeouts.connect": "3s"}))
    live = []

    def get():
        if not live or live[-1].status != "running":
            live.append(stack.enter_context(local_client(2)))
        return live[-1]

    with stack:
        yield get


@contextlib.contextmanager
def _holding(tmp_path, hold_chunk: int):
    """fit_catalog's task made :class:`_held_task.HoldChunk`, which keeps chunk
    ``hold_chunk`` waiting (``<tmp>/hold/held-<pid>``) until its worker dies (or
    60 s). Yields the hold folder."""
    import _held_task
    import cloudpickle

    cloudpickle.register_pickle_by_value(_held_task)  # workers need not import it
    hold = tmp_path / "hold"
    hold.mkdir()
    task = _held_task.HoldChunk(hold, f"star{hold_chunk * CHUNK:05d}", timeout=60)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog_mod, "fit_rows", task)
        yield hold


def _held_pid(hold: Path, min_parts: Path | None = None, timeout: float = 120) -> int:
    """The pid of the worker holding the chunk, once it holds it (and, with
    ``min_parts``, once that parts folder holds two chunk files)."""
    deadline = time.monotonic() + timeout
    while not (held := list(hold.glob("held-*"))) or (
        min_parts is not None and len(list(min_parts.glob("chunk-*.h5"))) < 2
    ):
        assert time.monotonic() < deadline, "the held chunk never started"
        time.sleep(0.01)
    return int(held[0].name.split("-")[1])


def _runs(hold: Path, chunk: int) -> list[int]:
    """Pids of the processes that fitted ``chunk`` to the end."""
    return [
        int(p.name.split("-")[2]) for p in hold.glob(f"ran-star{chunk * CHUNK:05d}-*")
    ]


@needs_dask
def test_worker_killed_mid_chunk_chunk_fitted_elsewhere(
    files, reference, fault_clusters, tmp_path
):
    """SIGKILL the worker process while it fits the last chunk: the chunk (whose data
    died with the worker) is fitted on a live worker, and the table has every row
    once, equal to the one-process run. Before the fix the run died with
    FutureCancelledError ("already forgotten"): scattered data is not recomputed.
    The last chunk, so that no chunk is on its way to the worker when it dies (then
    distributed leaves an unretrieved asyncio error that fails the test; the run
    itself sends the chunk again, _distributed._scatter)."""
    cat, _, emu = files
    out = tmp_path / "results.fits"
    client = fault_clusters()
    with _holding(tmp_path, hold_chunk=N_CHUNKS - 1) as hold:
        killed = []

        def kill():
            killed.append(_held_pid(hold))
            os.kill(killed[0], signal.SIGKILL)

        killer = threading.Thread(target=kill, daemon=True)
        killer.start()
        table = pl.fit_catalog(
            cat, out, emu, chunk_size=CHUNK, progress=False, client=client
        )
        killer.join()
    assert killed and table.meta["n_chunks_resumed"] == 0
    runs = _runs(hold, N_CHUNKS - 1)
    assert len(runs) == 1 and runs[0] != killed[0], (runs, killed)  # elsewhere, once
    assert_same_results(pl.read_results(out), reference)
    assert not parts_folder(out).exists()


@needs_dask
def test_scheduler_gone_clear_error_then_resume(
    files, reference, fault_clusters, tmp_path, capsys
):
    """The scheduler closes while chunk 1 is fitted (two others recorded): ``payne-lite
    fit --scheduler`` stops with one line that says so and how to resume (exit code
    1), the chunk files already written are intact, and the same command without a
    cluster fits only the missing chunks: every row once, equal to the one-process
    run. Before the fix: a FutureCancelledError traceback from distributed."""
    from payne_lite.cli import main

    cat, emu_path, _ = files
    out = tmp_path / "results.fits"
    argv = ["fit", str(cat), "--emulator", str(emu_path), "-o", str(out),
            "--chunk-size", str(CHUNK), "--no-progress"]  # fmt: skip
    client = fault_clusters()
    with _holding(tmp_path, hold_chunk=1) as hold:
        cluster = client.cluster

        def close_scheduler():
            _held_pid(hold, min_parts=parts_folder(out))
            cluster.sync(cluster.scheduler.close)

        closer = threading.Thread(target=close_scheduler, daemon=True)
        closer.start()
        code = main([*argv, "--scheduler", client.scheduler.address])
        closer.join()
        err = capsys.readouterr().err
    assert code == 1, err
    mine = [line for line in err.splitlines() if line.startswith("payne-lite")]
    assert len(mine) == 1 and "Traceback" not in err, err
    assert re.search(
        r"payne-lite: error: the Dask scheduler tcp://\S+ went away .* (\d+) finished "
        r"chunk\(s\) are kept in \S+results\.fits\.parts: run the same command "
        "again to resume",
        mine[0],
    ), mine[0]
    kept = {p.name: p.read_bytes() for p in parts_folder(out).glob("chunk-*.h5")}
    assert 2 <= len(kept) < N_CHUNKS and "chunk-000001.h5" not in kept
    assert not out.exists()
    for name in kept:  # intact: each reads back as its rows of the reference
        i = int(name[6:12])
        part = pl.read_results(parts_folder(out) / name)
        assert list(part["id"]) == list(reference["id"][i * CHUNK : (i + 1) * CHUNK])

    # the same command, in this process: only the missing chunks are fitted
    assert main(argv) == 0
    got = pl.read_results(out)
    assert got.meta["n_chunks_resumed"] == len(kept)
    assert_same_results(got, reference)


@needs_dask
def test_chunk_that_kills_its_workers_clear_error(files, tmp_path):
    """A chunk whose worker process dies every time it runs stops the run with
    ``pl.KilledWorkerError`` naming the chunk, its rows and what to do, not a raw
    RuntimeError (or distributed's ``KilledWorker``) traceback. Short: one chunk,
    one death (``MAX_RESENDS`` = 0; the default is 3), no fit compiled on the worker.
    (That the other chunks are kept and resumed: the scheduler test above; that a
    chunk waiting on the dying worker is not blamed: the same rule, ``_distributed.
    _was_running``.)"""
    import _held_task
    import cloudpickle

    from payne_lite.catalog import _distributed, local_client

    cloudpickle.register_pickle_by_value(_held_task)  # workers need not import it
    _, _, emu = files
    with pl.open_catalog(files[0]) as big:
        c = big.read(0, 20)
    cat = pl.write_catalog(
        tmp_path / "c.h5", c.flux, c.flux_err, emu.wavelength, ids=c.ids
    )
    out = tmp_path / "results.fits"
    dead = tmp_path / "dead"
    dead.mkdir()
    with local_client(1) as client, pytest.MonkeyPatch.context() as mp:
        mp.setattr(catalog_mod, "fit_rows", _held_task.DieOnChunk(dead, "star00000"))
        mp.setattr(_distributed, "MAX_RESENDS", 0)
        with pytest.raises(pl.KilledWorkerError) as info:
            pl.fit_catalog(cat, out, emu, chunk_size=20, progress=False, client=client)
    err = info.value
    assert (err.chunk, err.rows) == (0, (0, 20))
    assert len(list(dead.glob("died-*"))) == 1  # its worker process died on it
    assert re.search(
        r"chunk 0 \(catalog rows 0:20\) stopped the run: the Dask workers it was "
        r"sent to died 1 time\(s\) while they held or ran it .* run out of memory "
        r".* 0 finished chunk\(s\) are kept in \S+results\.fits\.parts: run the "
        "same command again to resume",
        str(err),
    ), err
    assert not out.exists()


def test_killed_worker_is_the_packages_error():
    """distributed's ``KilledWorker`` (the scheduler gave a chunk's task up after
    ``allowed-failures`` + 1 worker deaths) becomes ``pl.KilledWorkerError`` with the
    chunk, its rows and the number of deaths."""
    distributed = pytest.importorskip("distributed")
    from payne_lite.catalog._distributed import _killed

    raw = distributed.KilledWorker("payne-lite-chunk-x-4-0", None, 3)
    err = _killed(4, (1000, 1250), raw.allowed_failures + 1, raw)
    assert isinstance(err, pl.KilledWorkerError) and isinstance(err, RuntimeError)
    assert (err.chunk, err.rows) == (4, (1000, 1250))
    assert str(err).startswith(
        "chunk 4 (catalog rows 1000:1250) stopped the run: the Dask workers it was "
        "sent to died 4 time(s) while they held or ran it (KilledWorker)."
    )


def test_scatter_retries_a_worker_that_left_and_names_a_scheduler_that_did(
    monkeypatch,
):
    """A chunk's scatter that fails with the scheduler's KeyError on the chosen
    worker's address (distributed removed that worker during the transfer) is sent
    again while the scheduler runs; when the scheduler is gone (client no longer
    running) the error is raised for the run to report as SchedulerLostError
    (CI saw the KeyError escape as a traceback when the scheduler closed mid-run)."""
    from payne_lite.catalog import _distributed as dist

    monkeypatch.setattr(dist, "_SCATTER_PAUSE", 0.0)

    class Client:
        def __init__(self, fails, status_after):
            self.fails, self.status_after, self.status = fails, status_after, "running"
            self.calls = 0

        def scatter(self, data, hash):
            self.calls += 1
            if self.calls <= self.fails:
                self.status = self.status_after
                raise KeyError("tcp://127.0.0.1:32895")
            return ["future"]

    alive = Client(fails=2, status_after="running")
    assert dist._scatter(alive, object()) == "future" and alive.calls == 3
    gone = Client(fails=1, status_after="closed")
    with pytest.raises(KeyError):
        dist._scatter(gone, object())
    assert gone.calls == 1 and dist._scheduler_gone(gone, KeyError("x"))
    stubborn = Client(fails=99, status_after="running")
    with pytest.raises(KeyError):
        dist._scatter(stubborn, object())
    assert stubborn.calls == dist._SCATTER_TRIES


# --- resume and no loss -------------------------------------------------------------
_KILLED_RUN = """
import sys, time
import payne_lite as pl
from payne_lite.catalog import _runner  # fit_catalog looks fit_rows up here

fit_rows = _runner.fit_rows

def slow(*args, **kwargs):  # time to be killed between chunks
    table = fit_rows(*args, **kwargs)
    time.sleep(0.4)
    return table

_runner.fit_rows = slow
pl.fit_catalog(sys.argv[1], sys.argv[2], sys.argv[3], chunk_size=int(sys.argv[4]),
               progress=False)
"""


def _done_in_manifest(path: Path) -> list[int]:
    try:
        return json.loads(path.read_text())["done"]
    except (OSError, ValueError, KeyError):
        return []


def test_killed_run_resumes_with_every_row_once(
    files, reference, tmp_path, monkeypatch
):
    cat, emu_path, _ = files
    out = tmp_path / "results.fits"
    manifest = parts_folder(out) / "manifest.json"
    env = dict(os.environ)
    root = str(Path(pl.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    log = tmp_path / "killed_run.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_KILLED_RUN),
             str(cat), str(out), str(emu_path), str(CHUNK)],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while len(_done_in_manifest(manifest)) < 3:
            assert proc.poll() is None, log.read_text()[-2000:]
            assert time.monotonic() < deadline, "no chunk finished in 120 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    done = sorted(
        int(p.stem.split("-")[1]) for p in parts_folder(out).glob("chunk-*.h5")
    )
    assert 3 <= len(done) < N_CHUNKS
    # a kill during a write leaves a temporary file: ignored and removed on resume
    (parts_folder(out) / f".chunk-{N_CHUNKS - 1:06d}.h5.dead.tmp.h5").write_bytes(b"x")

    fitted = []
    fit_rows = catalog_mod.fit_rows

    def counting(chunk, **kw):
        fitted.append(chunk.ids[0])
        return fit_rows(chunk, **kw)

    monkeypatch.setattr(catalog_mod, "fit_rows", counting)
    # the same call again: only the missing chunks are fitted; the killed run's
    # lock is taken over, with a warning that names it
    with pytest.warns(RuntimeWarning, match=f"taking over the lock of pid {proc.pid}"):
        table = pl.fit_catalog(cat, out, emu_path, chunk_size=CHUNK, progress=False)
    missing = [i for i in range(N_CHUNKS) if i not in done]
    assert fitted == [f"star{i * CHUNK:05d}" for i in missing]
    assert table.meta["n_chunks_resumed"] == len(done)
    assert_same_results(pl.read_results(out), reference)
    assert not parts_folder(out).exists()  # cleaned up after the final write


def test_resume_with_other_inputs_or_options_is_refused(files, reference, tmp_path):
    cat, _, emu = files
    out = tmp_path / "results.h5"
    kw = dict(chunk_size=CHUNK, progress=False)
    pl.fit_catalog(cat, out, emu, keep_parts=True, **kw)
    parts = parts_folder(out)
    files_before = sorted(p.name for p in parts.iterdir())
    assert files_before == [*(f"chunk-{i:06d}.h5" for i in range(N_CHUNKS)),
                            "manifest.json"]  # fmt: skip
    assert_same_results(pl.read_results(out), reference)
    with pytest.raises(FileExistsError, match=r"results\.h5\.parts is also there"):
        pl.fit_catalog(cat, out, emu, **kw)
    out.unlink()  # as if the final write had not happened

    from conftest import build_tiny_emulator

    other_emu = build_tiny_emulator(n_pix=N_PIX, n_hid=3, seed=4)
    for call, differs in [
        (dict(emulator=other_emu), "emulator_sha256"),
        (dict(emulator=emu, options=pl.LMOptions(max_iter=50)), "fit_options_sha256"),
        (dict(emulator=emu, cont_deg=1), "fit_options"),
        (dict(emulator=emu, method="curve_fit"), "method"),
        (dict(emulator=emu, mask=np.arange(N_PIX) < 3), "mask_sha256"),
        (dict(emulator=emu, chunk_size=200), "chunk_size"),
    ]:
        args = {**kw, **call}
        with pytest.raises(ValueError, match=rf"cannot resume: .*differs: .*{differs}"):
            pl.fit_catalog(cat, out, args.pop("emulator"), **args)
    # the same catalog file, touched: its modification time is part of its identity
    os.utime(cat, ns=(time.time_ns(), time.time_ns()))
    with pytest.raises(ValueError, match=r"differs: input\.files.*--restart"):
        pl.fit_catalog(cat, out, emu, **kw)
    assert sorted(p.name for p in parts.iterdir()) == files_before
    assert not out.exists()

    # restart=True discards the old parts and fits everything again
    table = pl.fit_catalog(cat, out, emu, restart=True, **kw)
    assert table.meta["n_chunks_resumed"] == 0
    assert_same_results(pl.read_results(out), reference)
    assert not parts.exists()


def test_parts_folder_name_taken_or_foreign(files, tmp_path):
    cat, _, emu = files
    out = tmp_path / "r.fits"
    parts_folder(out).write_text("not a folder")
    with pytest.raises(FileExistsError, match=r"r\.fits\.parts exists and is not a"):
        pl.fit_catalog(cat, out, emu, chunk_size=CHUNK, progress=False)
    parts_folder(out).unlink()
    parts_folder(out).mkdir()
    (parts_folder(out) / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds no manifest.json"):
        pl.fit_catalog(cat, out, emu, chunk_size=CHUNK, progress=False)
    assert (parts_folder(out) / "notes.txt").read_text() == "mine"


def test_failed_first_chunk_leaves_no_parts(files, tmp_path):
    cat, _, emu = files
    out = tmp_path / "r.fits"
    with pytest.raises(ValueError, match="fixed"):
        pl.fit_catalog(cat, out, emu, chunk_size=CHUNK, progress=False,
                       fixed={"nope": 1.0})  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == []
