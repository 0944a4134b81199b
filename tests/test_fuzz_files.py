"""Damaged model and run files (issue: faults at catalog scale, fuzz every file type):
each damaged copy of an emulator (with a validation report), a grid, an MDN, a
posterior-samples file, a fit_catalog parts manifest or a training checkpoint
(truncated, a bit flipped in the headers or anywhere, a 512-byte block zeroed; for the
last two also another format version and foreign files) is refused with
FileFormatError or loads with its content unchanged; never other numbers, an
exception of another kind, a hang or a crash. The loads run in a child process with a
timeout, because libhdf5 can abort the process on a damaged header (the files'
checksum block is checked before it reads them: payne_lite._h5.check_stamp). Results
files: tests/test_results.py.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest
from test_results import _damaged_copies

import payne_lite as pl
from payne_lite.catalog import parts_folder

#: The children's last part: each damaged copy's fingerprint against its
#: original's, as "same", "changed", "refused" or "other: ..." (JSON on stdout).
_JOB_LOOP = r"""
out = {}
for ref_path, paths in jobs.items():
    ref = fingerprint(ref_path)
    for p in paths:
        try:
            out[p] = "same" if fingerprint(p) == ref else "changed"
        except pl.FileFormatError:
            out[p] = "refused"
        except Exception as err:
            out[p] = f"other: {type(err).__name__}: {err}"[:300]
print(json.dumps(out))
"""


_CHILD = (
    r"""
import hashlib, json, sys, warnings
import numpy as np
import payne_lite as pl
warnings.simplefilter("ignore")
kind, ref_path, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
emu_path = None
if kind == "mdn":  # the MDN's own emulator: the shipped default
    from payne_lite._datafiles import DEFAULT_EMULATOR, shipped_file
    emu_path = shipped_file(DEFAULT_EMULATOR)

def fingerprint(path):
    h = hashlib.sha256()
    if kind == "emulator":
        e = pl.Emulator.load(path)
        lab = e.label_lo + (e.label_hi - e.label_lo) * np.linspace(0.2, 0.8, 3)[:, None]
        arrays = [e.predict(lab), e.wavelength, e.label_lo, e.label_hi]
        r = e.report  # the validation report: its arrays and the tables made of them
        if r is not None:  # (benchmarks/bench_fuzz.py's emulator has none)
            arrays += [r.labels, r.spectrum_error, r.pixel_p99, r.coverage_2d,
                       r.label_bins().median, r.edge_bins().count]
        h.update(json.dumps([list(e.label_names), list(e.label_units),
                             None if r is None else r.provenance],
                            sort_keys=True).encode())
    elif kind == "mdn":
        m = pl.MDN.load(path)
        e = pl.Emulator.load(emu_path)
        lab = e.label_lo + (e.label_hi - e.label_lo) * np.linspace(0.3, 0.7, 2)[:, None]
        flux = e.predict(lab)
        arrays = list(m.predict(flux, np.full_like(flux, 0.01)))
        h.update(json.dumps(list(m.label_names)).encode())
    elif kind == "samples":
        from payne_lite.posterior import load_samples
        post, meta = load_samples(path)
        arrays = [*post.samples, *(w for w in post.weights if w is not None)]
        h.update(json.dumps([list(post.names), list(post.units), list(post.method),
                             meta], sort_keys=True, default=str).encode())
    else:
        g = pl.SpectralGrid.load(path)
        arrays = [g.labels, g.flux, g.wavelength]
        h.update(json.dumps([list(g.label_names), list(g.label_units)]).encode())
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

jobs = {ref_path: paths}
"""
    + _JOB_LOOP
)


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    from conftest import build_tiny_emulator

    folder = tmp_path_factory.mktemp("fuzz")
    emu = build_tiny_emulator(n_pix=80, n_hid=3, seed=5)
    rng = np.random.default_rng(2)
    held = emu.label_lo + (emu.label_hi - emu.label_lo) * rng.uniform(size=(40, 3))
    report = pl.ValidationReport.from_errors(
        rng.uniform(0, 0.01, (40, 80)),
        held,
        label_names=emu.label_names,
        label_units=emu.label_units,
        label_lo=emu.label_lo,
        label_hi=emu.label_hi,
        train_labels=held[:30],
        provenance={"grid_sha256": "0" * 64, "config": {"hidden": [3]}},
    )
    emu = dataclasses.replace(emu, report=report)
    emu.save(folder / "emu.h5")
    lab = emu.label_lo + (emu.label_hi - emu.label_lo) * rng.uniform(size=(20, 3))
    grid = pl.SpectralGrid(
        wavelength=emu.wavelength,
        labels=lab,
        flux=emu.predict(lab),
        label_names=emu.label_names,
        label_units=emu.label_units,
    )
    grid.save(folder / "grid.h5")
    from payne_lite._datafiles import DEFAULT_MDN, shipped_file
    from payne_lite.posterior import PosteriorSamples, save_samples

    post = PosteriorSamples(
        names=("Teff", "logg", "rv"), units=("K", "dex", "km/s"),
        samples=[rng.normal(size=(300, 3)), rng.normal(size=(200, 3))],
        weights=[None, rng.dirichlet(np.ones(200))], method=["emcee", "mdn-is"],
        n_chains=[30, 0], log_prob=[rng.normal(size=300), None],
    )  # fmt: skip
    save_samples(folder / "samples.h5", post, {"method": "emcee", "seed": 3})
    return {
        "samples": folder / "samples.h5",
        "emulator": folder / "emu.h5",
        "grid": folder / "grid.h5",
        "mdn": shipped_file(DEFAULT_MDN),  # a real trained MDN (2 MB)
    }


@pytest.mark.parametrize("kind", ["emulator", "grid", "mdn", "samples"])
def test_damaged_model_files_are_refused_or_read_unchanged(model_files, tmp_path, kind):
    src = model_files[kind]
    paths = _damaged_copies(src, tmp_path, np.random.default_rng(3), n_flip=16)
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, kind, str(src), *map(str, paths)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]  # no crash
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == len(paths)
    wrong = {k: v for k, v in got.items() if v not in ("refused", "same")}
    assert not wrong, wrong
    assert sum(v == "refused" for v in got.values()) >= len(paths) // 2


# --- the parts manifest and training checkpoints --------------------------------------
_CHILD_RUN = (
    r"""
import hashlib, json, sys, warnings
import numpy as np
import payne_lite as pl
warnings.simplefilter("ignore")
kind, ref_path, paths = sys.argv[1], sys.argv[2], sys.argv[3:]

def fingerprint(path):
    if kind == "manifest":
        from payne_lite.catalog._parts import read_manifest
        from pathlib import Path
        return json.dumps(read_manifest(Path(path)), sort_keys=True)
    import h5py
    from payne_lite.emulator._train_ckpt import TrainCheckpoint
    with h5py.File(ref_path, "r") as f:  # the identity a resuming run would have
        identity = json.loads(f.attrs["identity"])
    saved = TrainCheckpoint(path, identity, 1).load()
    h = hashlib.sha256()
    h.update(json.dumps([saved["iteration"], saved["elapsed"], saved["history"],
                         saved["rng_state"]], sort_keys=True).encode())
    for group in ("state", "tracker"):
        for k in sorted(saved[group]):
            a = np.ascontiguousarray(saved[group][k])
            h.update(f"{group}/{k}{a.dtype.str}{a.shape}".encode() + a.tobytes())
    return h.hexdigest()

jobs = {ref_path: paths}
"""
    + _JOB_LOOP
)


@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A parts folder of a finished 3-chunk catalog run (kept; its final file removed
    again, as if the run had stopped before it), the run's arguments and reference
    table, and a training checkpoint after 2 iterations."""
    from conftest import build_tiny_emulator, write_tiny_catalog
    from test_train import _teacher_grid

    d = tmp_path_factory.mktemp("runs")
    emu = build_tiny_emulator(n_pix=40, n_hid=3, seed=6)
    cat = write_tiny_catalog(d / "cat.h5", emu, 150)
    out = d / "out.fits"
    kw = dict(chunk_size=50, progress=False)
    pl.fit_catalog(cat, out, emu, keep_parts=True, **kw)
    reference = pl.read_results(out)
    out.unlink()
    grid = _teacher_grid(n_spec=60, n_pix=12)[0]
    ckpt = d / "ckpt.h5"
    pl.train_emulator(
        grid, max_iter=2, hidden=3, pixel_batch=8, progress=False,
        checkpoint=ckpt, checkpoint_every=1,
    )  # fmt: skip
    return {
        "manifest": parts_folder(out) / "manifest.json",
        "checkpoint": ckpt,
        "fit": (cat, out, emu, kw),
        "reference": reference,
        "emulator_file": emu.save(d / "emu.h5") or d / "emu.h5",
    }


def _wrong_and_foreign(kind: str, src, folder, emulator_file) -> list:
    """A copy of another format version (checksummed as that version would be), and
    foreign files: an emulator file, an empty file, JSON of something else."""
    import shutil

    from conftest import restamp

    paths = []
    if kind == "manifest":
        from payne_lite.catalog._parts import manifest_sha256

        man = json.loads(src.read_text())
        man["format_version"] = 99
        man["sha256"] = manifest_sha256(man)
        paths.append(folder / "version-99.json")
        paths[-1].write_text(json.dumps(man))
        paths.append(folder / "other.json")
        paths[-1].write_text(json.dumps({"format": "something.else", "done": [0]}))
    else:
        import h5py

        paths.append(folder / "version-99.h5")
        shutil.copy(src, paths[-1])
        with h5py.File(paths[-1], "r+") as f:
            f.attrs["format_version"] = 99
        restamp(paths[-1])
    paths.append(folder / f"emulator{src.suffix}")
    shutil.copy(emulator_file, paths[-1])
    paths.append(folder / f"empty{src.suffix}")
    paths[-1].write_bytes(b"")
    return paths


@pytest.mark.parametrize("kind", ["manifest", "checkpoint"])
def test_damaged_run_files_are_refused_or_read_unchanged(run_files, tmp_path, kind):
    """Damaged copies of a parts manifest (JSON with a sha256 of its content) and of
    a training checkpoint (HDF5 with the checksum block), copies of another format
    version and foreign files: FileFormatError or the same content, in a child
    process with a timeout (no hang, no crash, no other exception)."""
    src = run_files[kind]
    paths = _damaged_copies(src, tmp_path, np.random.default_rng(5), n_flip=16)
    odd = _wrong_and_foreign(kind, src, tmp_path, run_files["emulator_file"])
    paths += odd
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_RUN, kind, str(src), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == len(paths)
    wrong = {k: v for k, v in got.items() if v not in ("refused", "same")}
    assert not wrong, wrong
    assert all(got[str(p)] == "refused" for p in odd), got  # version, foreign
    assert sum(v == "refused" for v in got.values()) >= len(paths) // 2


def _flip_in_identity(manifest) -> None:
    """Change one hex digit of the emulator digest: still valid JSON (before the
    checksum, a resume read it as a run of another emulator)."""
    text = manifest.read_text()
    key = '"emulator_sha256": "'
    i = text.index(key) + len(key)
    manifest.write_text(text[:i] + ("0" if text[i] != "0" else "1") + text[i + 1 :])


def test_damaged_manifest_rebuilt_from_this_runs_chunks_or_refused(run_files):
    """A resume finding its manifest damaged (valid JSON, one identity digit
    changed) rebuilds it, with a warning, when every chunk file is this run's: the
    table equals the uninterrupted run. With a chunk file that is not this run's it
    is refused with FileFormatError and nothing is deleted; restart=True discards."""
    import shutil

    cat, out, emu, kw = run_files["fit"]
    parts = parts_folder(out)
    keep = out.parent / "kept.parts"
    shutil.copytree(parts, keep)
    try:
        _flip_in_identity(parts / "manifest.json")
        with pytest.warns(RuntimeWarning, match="damaged manifest .*written again"):
            table = pl.fit_catalog(cat, out, emu, keep_parts=True, **kw)
        assert table.meta["n_chunks_resumed"] == 3
        got, ref = pl.read_results(out), run_files["reference"]
        for name in ref.colnames:
            a, b = np.asarray(got[name]), np.asarray(ref[name])
            assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name
        out.unlink()

        _flip_in_identity(parts / "manifest.json")
        (parts / "chunk-000001.h5").write_bytes(b"not a chunk")
        before = sorted(p.name for p in parts.iterdir())
        with pytest.raises(pl.FileFormatError, match="chunk-000001.h5, which is not"):
            pl.fit_catalog(cat, out, emu, **kw)
        assert sorted(p.name for p in parts.iterdir()) == before
        assert not out.exists()
        table = pl.fit_catalog(cat, out, emu, restart=True, **kw)
        assert table.meta["n_chunks_resumed"] == 0 and not parts.exists()
        out.unlink()
    finally:  # the module's parts folder as it was
        shutil.rmtree(parts, ignore_errors=True)
        shutil.copytree(keep, parts)
        shutil.rmtree(keep)


_CHILD_CATALOG = (
    r"""
import hashlib, json, sys, warnings
import numpy as np
import payne_lite as pl
warnings.simplefilter("ignore")

def fingerprint(path):
    h = hashlib.sha256()
    with pl.open_catalog(path) as cat:
        h.update(f"{len(cat)} {cat.n_pix} {cat.per_row_wavelength}".encode())
        h.update(json.dumps(getattr(cat, "meta", None), sort_keys=True).encode())
        if cat.wavelength is not None:
            h.update(np.ascontiguousarray(cat.wavelength).tobytes())
        group = cat.read_group()
        if group is not None:
            h.update("\0".join(group).encode())
        for start in range(0, len(cat), 64):
            c = cat.read(start, min(start + 64, len(cat)))
            for a in (c.flux, c.flux_err, c.mask, c.ids, c.wavelength, c.group):
                if a is not None:
                    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

jobs = {sys.argv[1]: sys.argv[2:]}
if sys.argv[1] == "-":  # several originals: {original: [damaged copies]} on stdin
    jobs = json.loads(sys.stdin.read())
"""
    + _JOB_LOOP
)


def write_fuzz_catalog(path, emu, n: int, *, per_row: bool = False):
    """A catalog with every item: ``n`` spectra of ``emu`` with a mask, ids, a group
    (3 visits per star) and meta; ``per_row``: each spectrum on its own grid."""
    rng = np.random.default_rng(4)
    lo, hi = emu.label_lo, emu.label_hi
    flux = emu.predict(lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, emu.n_labels)))
    wave = emu.wavelength
    if per_row:
        wave = wave * (1 + rng.uniform(-1e-4, 1e-4, (n, 1)))
    return pl.write_catalog(
        path, flux, np.full_like(flux, 0.02), wave,
        mask=rng.uniform(size=flux.shape) < 0.05,
        ids=[f"2M{i:08d}" for i in range(n)], group=[f"star{i // 3}" for i in range(n)],
        meta={"survey": "fuzz", "n": n},
    )  # fmt: skip


def test_damaged_catalogs_are_refused_or_read_unchanged(tmp_path):
    """Catalogs (format version 3: HDF5 metadata checksums, Fletcher-32 on every
    numeric dataset, a SHA-256 of ids and group), one grid and one per spectrum:
    each damaged copy is refused with FileFormatError or read with every item
    unchanged (before version 3, 4 of 158 copies were read with changed values:
    benchmarks/bench_fuzz.py); never another exception (h5py's RuntimeError on a
    damaged link table, or its KeyError on a header failing its checksum, before
    the fixes), a crash or a hang."""
    from conftest import build_tiny_emulator

    emu = build_tiny_emulator(n_pix=80, n_hid=3, seed=5)
    jobs = {}
    for per_row in (False, True):
        src = write_fuzz_catalog(tmp_path / f"c{per_row}.h5", emu, 150, per_row=per_row)
        bad = tmp_path / f"bad{per_row}"
        bad.mkdir()
        paths = _damaged_copies(src, bad, np.random.default_rng(11), n_flip=12)
        jobs[str(src)] = [str(p) for p in paths]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_CATALOG, "-"], input=json.dumps(jobs),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == sum(map(len, jobs.values()))
    wrong = {k: v for k, v in got.items() if v not in ("refused", "same")}
    assert not wrong, wrong
    assert sum(v == "refused" for v in got.values()) >= len(got) // 2


def test_catalog_checksums_and_older_versions(tmp_path):
    """A value changed in place (a valid HDF5 file, so only payne_lite's checksums
    can tell) is refused: an id by ``strings_sha256``, a flux value by
    Fletcher-32 (h5py writes it again, so only through the raw bytes). A file
    labelled version 3 without the checksums is refused; versions 1 and 2 (written
    before the checksums, the one-grid wavelength unfiltered) are still read."""
    import h5py
    from conftest import build_tiny_emulator

    emu = build_tiny_emulator(n_pix=20, n_hid=3, seed=5)
    src = write_fuzz_catalog(tmp_path / "c.h5", emu, 30)
    with pl.open_catalog(src) as cat:
        ref = cat.read(0, 30)
    edited = tmp_path / "ids.h5"
    edited.write_bytes(src.read_bytes())
    with h5py.File(edited, "a") as f:
        f["ids"][7] = "2M99999999"
    with pytest.raises(pl.FileFormatError, match="'ids' do not match the checksum"):
        pl.open_catalog(edited)
    data = bytearray(src.read_bytes())
    at = data.find(np.asarray(ref.flux[11]).tobytes())
    assert at > 0
    data[at + 3] ^= 0x10
    edited.write_bytes(bytes(data))
    with pl.open_catalog(edited) as cat:  # one storage chunk holds all 30 rows
        with pytest.raises(pl.FileFormatError, match=r"rows \[10, 15\) are corrupt"):
            cat.read(10, 15)
    for version, wave in ((1, emu.wavelength), (2, np.stack([emu.wavelength] * 30)),
                          (3, emu.wavelength)):  # fmt: skip
        old = tmp_path / f"v{version}.h5"
        with h5py.File(old, "w") as f:  # as payne_lite wrote them before version 3
            f.attrs["format"], f.attrs["format_version"] = "payne_lite.Catalog", version
            f["wavelength"] = wave
            for name in ("flux", "flux_err"):
                f.create_dataset(name, data=getattr(ref, name), chunks=(8, 20),
                                 fletcher32=True)  # fmt: skip
            f["ids"] = ref.ids.astype(object).astype(h5py.string_dtype())
        if version == 3:
            with pytest.raises(pl.FileFormatError, match="has HDF5 metadata checksums"):
                pl.open_catalog(old)
            continue
        with pl.open_catalog(old) as cat:
            got = cat.read(0, 30)
        np.testing.assert_array_equal(got.flux, ref.flux)
        np.testing.assert_array_equal(got.ids, ref.ids)


def test_catalog_id_not_utf8_is_refused(tmp_path):
    """An id whose bytes are damaged into invalid UTF-8 (found by
    benchmarks/bench_fuzz.py: a raw UnicodeDecodeError from h5py before the fix)
    is refused by the ids' checksum; with a checksum that matches (as a file
    written so, or of version 1 or 2, would have) it is a FileFormatError naming
    the rows."""
    from conftest import build_tiny_emulator, redigest_catalog, write_tiny_catalog

    emu = build_tiny_emulator(n_pix=20, n_hid=3, seed=5)
    src = write_tiny_catalog(tmp_path / "catalog.h5", emu, 150)
    data = bytearray(src.read_bytes())
    at = data.find(b"s123")
    assert at > 0 and data.count(b"s123") == 1
    data[at] = 0xB1  # not a UTF-8 start byte
    src.write_bytes(bytes(data))
    with pytest.raises(pl.FileFormatError, match="'ids' do not match the checksum"):
        pl.open_catalog(src)
    redigest_catalog(src)
    with pl.open_catalog(src) as cat:
        cat.read(0, 100)  # rows before the damaged id read as written
        with pytest.raises(pl.FileFormatError, match=r"rows \[100, 150\) are corrupt"):
            cat.read(100, 150)


# --- inputs: APOGEE FITS files and plain HDF5 / FITS-table catalogs ---------------------
_CHILD_INPUT = (
    r"""
import hashlib, json, sys, warnings
import numpy as np
import payne_lite as pl
warnings.simplefilter("ignore")
ref_path, paths = sys.argv[1], sys.argv[2:]

def fingerprint(path):
    h = hashlib.sha256()
    ways = [{}]  # as open_catalog reads it (APOGEE: normalised by the kind of file)
    if path.endswith(".fits") and "table" not in path:  # and every row, as stored
        ways.append(dict(visits=True, continuum="none"))
    for opts in ways:
        with pl.open_catalog(path, **opts) as cat:
            h.update(f"{type(cat).__name__} {len(cat)} {cat.n_pix}".encode())
            h.update(json.dumps(cat.provenance(), sort_keys=True).encode())
            if cat.wavelength is not None:
                h.update(np.ascontiguousarray(cat.wavelength).tobytes())
            c = cat.read(0, len(cat))
            for a in (c.flux, c.flux_err, c.mask, c.ids, c.wavelength, c.group):
                if a is not None:
                    h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()

jobs = {ref_path: paths}
if ref_path == "-":  # several originals: {original: [damaged copies]} on stdin
    jobs = json.loads(sys.stdin.read())
"""
    + _JOB_LOOP
)

#: Input kinds fuzzed and whether their files carry checksums (FITS CHECKSUM /
#: DATASUM): without, damage to the numbers cannot be told from other numbers.
INPUT_KINDS = {
    "apstar": False,  # the real survey files: no CHECKSUM / DATASUM
    "aspcapstar": False,
    "apstar-checksum": True,  # the real apStar written again with them
    "plain-h5": False,  # an HDF5 file as h5py writes one by default
    "fits-table": False,
    "fits-table-checksum": True,
}


def input_files(folder) -> dict:
    """A file of each of :data:`INPUT_KINDS`: the real DR13 apStar and aspcapStar
    files of one star (``data/apogee_raw``), the apStar file written again by astropy
    with CHECKSUM / DATASUM, and its rows (combined spectra and visits) as a plain
    HDF5 file and as a FITS table of spectra (with and without checksums)."""
    import h5py
    from astropy.io import fits

    star = pl.datasets.apogee_raw().stars[1]
    files = {"apstar": star.apstar, "aspcapstar": star.aspcapstar}
    files["apstar-checksum"] = folder / star.apstar.name
    with fits.open(star.apstar) as hdul:
        hdul.writeto(files["apstar-checksum"], checksum=True)
        n_rows = hdul[1].shape[0]
    rows = [pl.catalog.read_apogee_fits(star.apstar, row=r) for r in range(n_rows)]
    flux = np.stack([r.flux for r in rows]).astype(np.float32)
    err = np.stack([r.flux_err for r in rows]).astype(np.float32)
    err[~np.isfinite(err) | (err > 1e9)] = 1e9
    mask = np.stack([r.mask for r in rows])
    ids = [f"{star.star}[{r}]" for r in range(n_rows)]
    files["plain-h5"] = folder / "plain.h5"
    with h5py.File(files["plain-h5"], "w") as f:
        f["flux"], f["flux_err"], f["mask"] = flux, err, mask
        f["wavelength"] = rows[0].wavelength
        f["ids"] = np.array(ids, dtype=object).astype(h5py.string_dtype())
    p = flux.shape[1]
    cols = [
        fits.Column("FLUX", f"{p}E", array=flux),
        fits.Column("FLUX_ERR", f"{p}E", array=err),
        fits.Column("WAVELENGTH", f"{p}D", unit="Angstrom",
                    array=np.broadcast_to(rows[0].wavelength, flux.shape)),
        fits.Column("MASK", f"{p}L", array=mask),
        fits.Column("ID", "24A", array=np.array(ids)),
    ]  # fmt: skip
    table = fits.BinTableHDU.from_columns(cols)
    for kind, checksum in (("fits-table", False), ("fits-table-checksum", True)):
        files[kind] = folder / f"{kind}.fits"
        fits.HDUList([fits.PrimaryHDU(), table]).writeto(files[kind], checksum=checksum)
    return files


def damaged_inputs(src, folder, rng, n_flip: int) -> list:
    """:func:`_damaged_copies` of ``src``, each in a folder of its own under the
    name of ``src`` (APOGEE files are told apart by their names, and their ids are
    the names)."""
    import shutil

    flat = folder / "flat"
    flat.mkdir(parents=True)
    out = []
    for p in _damaged_copies(src, flat, rng, n_flip=n_flip):
        (folder / p.stem).mkdir()
        out.append(folder / p.stem / src.name)
        shutil.move(p, out[-1])
    flat.rmdir()
    return out


def test_damaged_inputs_are_refused_or_read(tmp_path):
    """Damaged copies of APOGEE apStar / aspcapStar files and plain HDF5 / FITS-table
    catalogs: refused with FileFormatError or read, never another exception (an
    astropy KeyError or VerifyError, h5py's RuntimeError, before the fixes), a crash
    or a hang; files that carry FITS checksums are refused or read unchanged
    (without checksums, damage to the numbers reads as other numbers:
    benchmarks/bench_fuzz.py counts it)."""
    files = input_files(tmp_path)
    jobs, checked = {}, {}
    for kind in ("apstar", "apstar-checksum", "plain-h5", "fits-table-checksum"):
        has_checksum = INPUT_KINDS[kind]  # (all kinds: benchmarks/bench_fuzz.py)
        paths = damaged_inputs(
            files[kind], tmp_path / kind, np.random.default_rng(7), n_flip=4
        )
        jobs[str(files[kind])] = [str(p) for p in paths]
        checked.update(dict.fromkeys(jobs[str(files[kind])], has_checksum))
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD_INPUT, "-"], input=json.dumps(jobs),
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(got) == sorted(checked)
    ok = {True: ("refused", "same"), False: ("refused", "same", "changed")}
    wrong = {k: v for k, v in got.items() if v not in ok[checked[k]]}
    assert not wrong, wrong
    n_checked_refused = sum(v == "refused" for k, v in got.items() if checked[k])
    assert n_checked_refused >= sum(checked.values()) // 2  # the checksums work


def test_checksummed_fits_inputs_are_verified(tmp_path):
    """One flipped bit in the flux of a FITS file with CHECKSUM / DATASUM (an apStar
    file, a FITS table of spectra) is refused naming the checksum; the same flip in
    the file without them reads as another value (only its structure can be
    checked)."""
    from astropy.io import fits

    files = input_files(tmp_path)
    for kind, opts in (("apstar", {"continuum": "none"}), ("fits-table", {})):
        for src, checksummed in (
            (files[kind], False),
            (files[f"{kind}-checksum"], True),
        ):
            with pl.open_catalog(src, **opts) as cat:
                before = cat.read(0, 1).flux[0]
            with fits.open(src) as hdul:  # pixel 3000 of row 0's flux, as stored
                raw = hdul[1].data if kind == "apstar" else hdul[1].data["FLUX"]
                value = np.array(raw[0, 3000], dtype=">f4").tobytes()
            data = bytearray(src.read_bytes())
            at = data.find(value)
            assert at > 2880  # in the data, after the primary header
            data[at] ^= 0x01  # the exponent's lowest bit: twice or half the value
            bad = tmp_path / f"bad-{kind}-{checksummed}" / src.name
            bad.parent.mkdir()
            bad.write_bytes(bytes(data))
            if checksummed:
                with pytest.raises(pl.FileFormatError, match="verification failed"):
                    pl.open_catalog(bad, **opts)
                continue
            with pl.open_catalog(bad, **opts) as cat:
                after = cat.read(0, 1).flux[0]
            assert np.flatnonzero(after != before).tolist() == [3000]
