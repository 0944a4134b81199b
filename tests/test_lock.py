"""One owner per output (payne_lite.catalog._lock): a second fit_catalog run on the
same output is refused at once, naming the live owner; a lock left by a dead run is
taken over with a warning; restart=True does not break a live run's lock.

Owners are real processes (a child Python that takes the lock and waits), killed
with SIGKILL to leave a stale lock, as a crash or a lost node would. Emulators are
conftest's tiny ones (60 pixels), so a whole run takes seconds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_tiny_catalog

import payne_lite as pl
from payne_lite import OutputLockedError
from payne_lite.catalog import _lock
from payne_lite.catalog._lock import OutputLock, lock_path

ROOT = Path(__file__).resolve().parents[1]
N_SPEC, N_PIX = 12, 60

_HOLDER = r"""
import sys
sys.path.insert(0, {root!r})
from payne_lite.catalog._lock import OutputLock
lock = OutputLock({out!r})
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # until the test closes stdin (or kills us)
lock.release()
"""


@pytest.fixture(scope="module")
def emu():
    from conftest import build_tiny_emulator

    return build_tiny_emulator(n_pix=N_PIX, n_hid=3, seed=3)


@pytest.fixture(scope="module")
def cat(tmp_path_factory, emu):
    folder = tmp_path_factory.mktemp("lockcat")
    path = write_tiny_catalog(folder / "cat.h5", emu, N_SPEC)
    emu_path = folder / "emu.h5"
    emu.save(emu_path)
    return path, emu_path


@contextlib.contextmanager
def holder(out: Path):
    """A child process that holds the lock of ``out`` until the ``with`` block ends
    (its stdin closes), or until the block kills it."""
    env = {**os.environ, "PAYNE_LITE_COMPILATION_CACHE": "off"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER.format(root=str(ROOT), out=str(out))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield proc
    finally:
        proc.stdin.close()
        proc.wait(timeout=30)
        proc.stdout.close()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_is_refused_naming_the_owner(tmp_path, cat):
    cat_path, emu_path = cat
    out = tmp_path / "out.fits"
    parts = tmp_path / "out.fits.parts"
    parts.mkdir()
    (parts / "keep-me").write_text("the owner's")
    with holder(out) as owner:
        t = time.perf_counter()
        for restart in (False, True):
            with pytest.raises(OutputLockedError) as info:
                pl.fit_catalog(cat_path, out, emu_path, restart=restart)
            msg = str(info.value)
            assert f"pid {owner.pid} on host {socket.gethostname()!r}" in msg
            assert "another fit_catalog run owns this output" in msg
            assert info.value.owner["pid"] == owner.pid
        assert time.perf_counter() - t < 5.0  # at once, before any fit
        # restart=True deleted nothing of the live owner's
        assert (parts / "keep-me").read_text() == "the owner's"
        assert not out.exists()
        assert json.loads(lock_path(out).read_text())["pid"] == owner.pid
    assert not lock_path(out).exists()  # the owner removed its lock when done


def test_lock_of_a_killed_run_is_taken_over(tmp_path, cat):
    cat_path, emu_path = cat
    out = tmp_path / "out.h5"
    with holder(out) as owner:
        owner.send_signal(signal.SIGKILL)  # as a crash or a lost node: no clean-up
        owner.wait(timeout=30)
    assert lock_path(out).exists()
    with pytest.warns(RuntimeWarning, match=f"taking over the lock of pid {owner.pid}"):
        t = pl.fit_catalog(cat_path, out, emu_path, progress=False)
    assert len(t) == N_SPEC and out.exists()
    assert not lock_path(out).exists()


def test_two_runs_started_together_one_wins(tmp_path, cat):
    """The issue's case: the same command twice (enter pressed twice, or two jobs
    with the same arguments). One run writes the table; the other stops with one
    line naming the owner (or, if it came after the winner had finished, that the
    output exists), and no traceback from inside the parts folder."""
    cat_path, emu_path = cat
    out = tmp_path / "out.h5"
    go = tmp_path / "go"
    code = (
        "import sys, time, os\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from payne_lite.cli import main\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.01)\n"
        f"sys.exit(main(['fit', {str(cat_path)!r}, '--emulator', {str(emu_path)!r}, "
        f"'-o', {str(out)!r}, '--no-progress']))\n"
    )
    env = {**os.environ, "PAYNE_LITE_COMPILATION_CACHE": "off"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env
        )
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = [p.returncode for p in procs]
    assert sorted(codes)[0] == 0 and sorted(codes)[1] != 0, (codes, errs)
    loser = errs[codes.index(max(codes))]
    assert "Traceback" not in loser, loser
    assert ("another fit_catalog run owns this output" in loser) or (
        "exists" in loser
    ), loser
    t = pl.read_results(out)
    assert list(t["id"]) == [f"s{i}" for i in range(N_SPEC)]  # each once
    assert not lock_path(out).exists()
    assert not (tmp_path / "out.h5.parts").exists()


def test_same_process_cannot_take_it_twice(tmp_path):
    out = tmp_path / "x.fits"
    with OutputLock(out) as first:
        assert first.held
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            OutputLock(out).acquire()
    assert not lock_path(out).exists()
    with OutputLock(out):  # free again
        pass


def test_unreadable_lock_file_without_owner_is_taken_over(tmp_path):
    out = tmp_path / "x.fits"
    lock_path(out).write_bytes(b"\x00garbage")
    with pytest.warns(RuntimeWarning, match="empty or unreadable"):
        with OutputLock(out) as lock:
            owner = json.loads(lock_path(out).read_text())
            assert owner["pid"] == os.getpid() and owner == lock.owner


def _write_owner(out, **fields):
    owner = {
        "format": _lock.LOCK_FORMAT,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _lock._process_start(os.getpid()),
        "started": "2026-01-01T00:00:00+00:00",
        "argv": ["payne-lite", "fit"],
        **fields,
    }
    lock_path(out).write_text(json.dumps(owner))
    return owner


def test_without_flock_the_file_decides(tmp_path, monkeypatch):
    """On a filesystem without flock: a live process of this host owns the output;
    a dead pid, or a reused one (another start time), is stale; another host's
    lock is taken as live, with the file named to delete."""
    monkeypatch.setattr(OutputLock, "_flock", staticmethod(lambda fd: None))
    out = tmp_path / "x.fits"
    _write_owner(out)  # this very process: alive
    with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
        OutputLock(out).acquire()
    _write_owner(out, host="node-17.cluster")
    with pytest.raises(OutputLockedError, match=f"delete {lock_path(out)}"):
        OutputLock(out).acquire()
    if _lock._process_start(os.getpid()) is not None:  # Linux /proc
        _write_owner(out, process_start=1)  # same pid, another process
        with pytest.warns(RuntimeWarning, match="taking over"):
            OutputLock(out).acquire()
    dead = _dead_pid()
    _write_owner(out, pid=dead)
    with pytest.warns(RuntimeWarning, match=f"pid {dead}"):
        lock = OutputLock(out)
        lock.acquire()
    lock.release()
    assert not lock_path(out).exists()


def test_cli_refuses_with_one_line_and_exit_1(tmp_path, cat, capsys):
    from payne_lite.cli import main

    cat_path, emu_path = cat
    out = tmp_path / "out.fits"
    with holder(out) as owner:
        code = main(["fit", str(cat_path), "--emulator", str(emu_path), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("payne-lite: error: ") and err.count("\n") == 1
    assert f"pid {owner.pid}" in err
