"""A disk that fills up while fit_catalog writes (issue: faults at catalog scale).

The disk is simulated with ``RLIMIT_FSIZE`` in a child process (SIGXFSZ ignored, so
a write past the limit fails with EFBIG, as a full disk fails with ENOSPC): each
file the run writes may grow to the limit and no further. The parts (10 rows, 11 kB
each) and the manifest (under 1 kB) fit under 16 kB, the final table (40 rows) does
not. Every case must end with one clear error line naming the file, no half-written
file in place, the parts written so far intact, and a later run that resumes and
completes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import payne_lite as pl

ROOT = Path(__file__).resolve().parents[1]
N_SPEC, N_PIX, CHUNK = 40, 60, 10

_RUN = r"""
import resource, signal, sys
sys.path.insert(0, {root!r})
from payne_lite.cli import main
limit = {limit}
if limit:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
sys.exit(main({argv!r}))
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from conftest import build_tiny_emulator, write_tiny_catalog

    emu = build_tiny_emulator(n_pix=N_PIX, n_hid=3, seed=3)
    folder = tmp_path_factory.mktemp("diskfull")
    cat = write_tiny_catalog(folder / "cat.h5", emu, N_SPEC)
    emu.save(folder / "emu.h5")
    ref = pl.fit_catalog(cat, folder / "ref.h5", emu, chunk_size=CHUNK, progress=False)
    return cat, folder / "emu.h5", ref


def _fit(files, out, limit=0):
    cat, emu, _ = files
    argv = ["fit", str(cat), "--emulator", str(emu), "-o", str(out)]
    argv += ["--chunk-size", str(CHUNK), "--no-progress"]
    env = {**os.environ, "PAYNE_LITE_COMPILATION_CACHE": "off"}
    code = _RUN.format(root=str(ROOT), limit=int(limit), argv=argv)
    p = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env,
        timeout=300,
    )  # fmt: skip
    return p.returncode, p.stderr


def _leftovers(folder: Path) -> list[str]:
    """Temporary files anywhere under ``folder`` (half-written, never renamed)."""
    return sorted(p.name for p in folder.rglob(".*") if ".tmp" in p.name)


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("payne-lite: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ECSV is written by Python's own file writes (already a clean OSError); FITS and
# HDF5 went through astropy's numpy writes and libhdf5
@pytest.mark.parametrize("suffix", [".fits", ".h5"])
def test_final_table_on_a_full_disk_then_resume(tmp_path, files, suffix):
    out = tmp_path / f"out{suffix}"
    code, err = _fit(files, out, limit=16_000)
    assert code == 2, err  # a clean error, not a crash (a signal gives < 0)
    line = _error_line(err)
    assert "file too large" in line and out.name in line
    assert f"{N_SPEC // CHUNK} finished chunk(s) are kept" in line
    assert "run the same command again to resume" in line
    assert not out.exists() and not _leftovers(tmp_path)
    assert not (tmp_path / f"{out.name}.lock").exists()
    parts = tmp_path / f"{out.name}.parts"
    assert sorted(p.name for p in parts.iterdir()) == [
        *(f"chunk-{i:06d}.h5" for i in range(N_SPEC // CHUNK)),
        "manifest.json",
    ]
    code, err = _fit(files, out)  # space is back
    assert code == 0, err
    t = pl.read_results(out)
    assert t.meta["n_chunks_resumed"] == N_SPEC // CHUNK
    ref = files[2]
    assert list(t["id"]) == list(ref["id"])
    for name in ("Teff", "rv", "chi2"):
        np.testing.assert_allclose(t[name], ref[name], rtol=1e-5)
    assert not parts.exists()


def test_parts_on_a_full_disk_leave_nothing_half_written(tmp_path, files):
    """The parts do not fit (8 kB): before the fix, h5py failed inside HDF5, left the
    temporary part behind and crashed the process (SIGSEGV) freeing its objects."""
    out = tmp_path / "out.fits"
    code, err = _fit(files, out, limit=8_000)
    assert code == 2, err
    line = _error_line(err)
    assert "chunk-000000.h5" in line and "file too large" in line
    assert not _leftovers(tmp_path) and not out.exists()
    code, err = _fit(files, out)
    assert code == 0, err
    assert len(pl.read_results(out)) == N_SPEC


def test_manifest_on_a_full_disk(tmp_path, files):
    out = tmp_path / "out.fits"
    code, err = _fit(files, out, limit=300)  # the manifest is the first file written
    assert code == 2, err
    assert "manifest.json" in _error_line(err)
    assert not _leftovers(tmp_path) and not out.exists()
    code, err = _fit(files, out)
    assert code == 0, err
