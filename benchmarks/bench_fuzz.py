"""Fuzz every file type the package reads: damaged copies refused, or read unchanged.

    python benchmarks/bench_fuzz.py                    # 150 bit flips per type
    python benchmarks/bench_fuzz.py --flips 40 --only manifest,checkpoint --json f.json

Issue 17, part 5: "Fuzz every file type the package reads (grid, emulator, MDN,
catalog, results in FITS / ECSV / HDF5, samples, parts manifest, checkpoints):
truncation, bit flips in headers and data, zeroed blocks, wrong-version and foreign
files; each is refused with FileFormatError within a few seconds, or read with its
content unchanged".

For each type, one small file is written (the test suite's files: a random 80-pixel
emulator, a 20-spectrum grid of it, the shipped MDN, a two-star samples file, a
fitted results table in each format, a 150-spectrum catalog with every item (mask,
ids, group, meta) on one grid and one on a grid per spectrum, the manifest of a kept
3-chunk parts folder, a training checkpoint) or taken as it is (the inputs: a real
DR13 apStar and aspcapStar file, the apStar written again with FITS checksums, its
rows as a plain HDF5 file and as a FITS table without and with checksums:
``tests/test_fuzz_files.py::input_files``), then damaged copies of it
(``tests/test_results.py::_damaged_copies``: 4 truncations, ``--flips`` single-bit
flips, half in the first 4 kB where the headers are, 4 zeroed 512-byte blocks; for the
manifest and checkpoint also a copy of another format version and foreign files).
Each copy is read in a child process (the tests' readers and fingerprints), a batch
at a time with a timeout; a batch that crashes or hangs is read again one file per
process, so that each copy gets its own verdict:

* refused: ``FileFormatError``;
* unchanged: read, with the same content as the original (damage in unused bytes);
* changed: read, with other content, and no error (must be 0);
* other: another exception (must be 0);
* crash: the reading process died (a signal, an abort in libhdf5);
* hang: no answer within ``--timeout`` s per file.

Inputs without checksums (the APOGEE files as the survey delivers them, plain HDF5
and FITS tables written without them) can only be checked for their structure:
damage to their numbers reads as other numbers (``changed``), which is counted, not
failed; every other type (catalogs from format version 3 on included) must have 0.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tests' helpers and child scripts

from test_fuzz_files import INPUT_KINDS  # noqa: E402

KINDS = ("emulator", "grid", "mdn", "samples", "results-fits", "results-ecsv",
         "results-h5", "catalog", "catalog-rows", "manifest", "checkpoint",
         *INPUT_KINDS)  # fmt: skip
#: Kinds whose damage cannot all be detected (no checksum): "changed" is reported.
UNCHECKED = tuple(k for k, checked in INPUT_KINDS.items() if not checked)


def make_files(folder: Path) -> dict:
    """One file of each kind (as the tests make them), and the emulator file."""
    from conftest import build_tiny_emulator, write_tiny_catalog
    from test_fuzz_files import input_files, write_fuzz_catalog
    from test_train import _teacher_grid

    import payne_lite as pl
    from payne_lite._datafiles import DEFAULT_MDN, shipped_file
    from payne_lite.posterior import PosteriorSamples, save_samples

    emu = build_tiny_emulator(n_pix=80, n_hid=3, seed=5)
    emu.save(folder / "emu.h5")
    rng = np.random.default_rng(2)
    lab = emu.label_lo + (emu.label_hi - emu.label_lo) * rng.uniform(size=(20, 3))
    pl.SpectralGrid(
        wavelength=emu.wavelength, labels=lab, flux=emu.predict(lab),
        label_names=emu.label_names, label_units=emu.label_units,
    ).save(folder / "grid.h5")  # fmt: skip
    post = PosteriorSamples(
        names=("Teff", "logg", "rv"), units=("K", "dex", "km/s"),
        samples=[rng.normal(size=(300, 3)), rng.normal(size=(200, 3))],
        weights=[None, rng.dirichlet(np.ones(200))], method=["emcee", "mdn-is"],
        n_chains=[30, 0], log_prob=[rng.normal(size=300), None],
    )  # fmt: skip
    save_samples(folder / "samples.h5", post, {"method": "emcee", "seed": 3})
    cat = write_tiny_catalog(folder / "catalog.h5", emu, 150)
    out = folder / "out.fits"
    table = pl.fit_catalog(cat, out, emu, chunk_size=50, progress=False,
                           keep_parts=True)  # fmt: skip
    files = {
        "emulator": folder / "emu.h5",
        "grid": folder / "grid.h5",
        "mdn": shipped_file(DEFAULT_MDN),
        "samples": folder / "samples.h5",
        "catalog": write_fuzz_catalog(folder / "rich.h5", emu, 150),
        "catalog-rows": write_fuzz_catalog(folder / "rows.h5", emu, 150, per_row=True),
        "manifest": pl.catalog.parts_folder(out) / "manifest.json",
    }
    for suffix in ("fits", "ecsv", "h5"):
        files[f"results-{suffix}"] = pl.write_results(table, folder / f"r.{suffix}")
    grid = _teacher_grid(n_spec=60, n_pix=12)[0]
    pl.train_emulator(grid, max_iter=2, hidden=3, pixel_batch=8, progress=False,
                      checkpoint=folder / "ckpt.h5", checkpoint_every=1)  # fmt: skip
    files["checkpoint"] = folder / "ckpt.h5"
    inputs = folder / "inputs"
    inputs.mkdir()
    return {**files, **input_files(inputs)}


def child_of(kind: str) -> tuple[str, list[str]]:
    """(child script, its leading arguments before the reference path)."""
    import test_fuzz_files as F
    import test_results as R

    if kind.startswith("results"):
        return R._FUZZ_CHILD, []
    if kind.startswith("catalog"):
        return F._CHILD_CATALOG, []
    if kind in INPUT_KINDS:
        return F._CHILD_INPUT, []
    if kind in ("manifest", "checkpoint"):
        return F._CHILD_RUN, [kind]
    return F._CHILD, [kind]


def _run(script, lead, ref, paths, timeout):
    """{path: verdict} of one child; None if it crashed or hung."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, *lead, str(ref), *map(str, paths)],
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "hang"
    if proc.returncode != 0:
        return "crash"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def fuzz(kind, src, folder, files, n_flip, seed, timeout, batch=40) -> dict:
    from test_fuzz_files import _wrong_and_foreign, damaged_inputs
    from test_results import _damaged_copies

    folder.mkdir()
    rng = np.random.default_rng(seed)
    if kind in INPUT_KINDS:  # each under its own name, in a folder of its own
        paths = damaged_inputs(src, folder, rng, n_flip)
    else:
        paths = _damaged_copies(src, folder, rng, n_flip=n_flip)
    if kind in ("manifest", "checkpoint"):
        paths += _wrong_and_foreign(kind, src, folder, files["emulator"])
    script, lead = child_of(kind)
    verdicts = {}
    for i in range(0, len(paths), batch):
        part = paths[i : i + batch]
        got = _run(script, lead, src, part, 30 + timeout * len(part))
        if isinstance(got, dict):
            verdicts.update(got)
            continue
        for p in part:  # one per process: which one crashed or hung
            one = _run(script, lead, src, [p], 30 + timeout)
            verdicts[str(p)] = one if isinstance(one, str) else one[str(p)]
    counts = dict.fromkeys(("refused", "unchanged", "changed", "other", "crash",
                            "hang"), 0)  # fmt: skip
    examples = {}
    for p, v in verdicts.items():
        key = {"same": "unchanged"}.get(v, v.split(":")[0])
        counts[key] += 1
        if key not in ("refused", "unchanged"):
            examples.setdefault(key, f"{Path(p).relative_to(folder)}: {v}")
    return {"cases": len(paths), **counts, "examples": examples}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flips", type=int, default=150, help="bit flips per type")
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per file")
    ap.add_argument("--only", help=f"comma-separated kinds of {', '.join(KINDS)}")
    ap.add_argument("--json", type=Path, help="write the counts here")
    args = ap.parse_args(argv)
    kinds = KINDS if not args.only else tuple(args.only.split(","))
    unknown = set(kinds) - set(KINDS)
    if unknown:
        ap.error(f"unknown kinds {sorted(unknown)}; known: {', '.join(KINDS)}")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = make_files(tmp)
        for kind in kinds:
            t0 = time.perf_counter()
            rows[kind] = fuzz(kind, files[kind], tmp / f"fuzz-{kind}", files,
                              args.flips, args.seed, args.timeout)  # fmt: skip
            rows[kind]["seconds"] = round(time.perf_counter() - t0, 1)
            print(f"  {kind}: {rows[kind]['cases']} copies, "
                  f"{rows[kind]['seconds']} s", flush=True)  # fmt: skip
    cols = ("cases", "refused", "unchanged", "changed", "other", "crash", "hang")
    print()
    print("| file type | " + " | ".join(cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for kind, r in rows.items():
        print(f"| {kind} | " + " | ".join(str(r[c]) for c in cols) + " |")
    for kind, r in rows.items():
        for key, text in r["examples"].items():
            print(f"  {kind} {key}: {text}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    ok = all(
        r[c] == 0
        for k, r in rows.items()
        for c in ("changed", "other", "crash", "hang")
        if not (c == "changed" and k in UNCHECKED)  # no checksum: reported
    )
    for k in UNCHECKED:
        if k in rows:
            r = rows[k]
            print(f"  {k} (no checksum): {r['changed']} of {r['cases']} damaged "
                  "copies read with other content, undetectable")  # fmt: skip
    print("PASS" if ok else "FAIL (a checked type read changed, or a type crashed, "
          "hung or raised another exception)")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
