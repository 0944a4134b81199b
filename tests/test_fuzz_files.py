"""Damaged model files (issue: faults at catalog scale, fuzz every file type): each
damaged copy of an emulator (with a validation report), a grid, an MDN or a
posterior-samples file (truncated, a bit flipped in the headers or anywhere, a
512-byte block zeroed) is refused with
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

_CHILD = r"""
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
        arrays += [r.labels, r.spectrum_error, r.pixel_p99, r.coverage_2d,
                   r.label_bins().median, r.edge_bins().count]
        h.update(json.dumps([list(e.label_names), list(e.label_units),
                             r.provenance], sort_keys=True).encode())
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

ref = fingerprint(ref_path)
out = {}
for p in paths:
    try:
        out[p] = "same" if fingerprint(p) == ref else "changed"
    except pl.FileFormatError:
        out[p] = "refused"
    except Exception as err:
        out[p] = f"other: {type(err).__name__}: {err}"[:300]
print(json.dumps(out))
"""


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
