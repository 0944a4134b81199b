"""What the catalog checksums cost a reader (issue 17: catalogs protected).

    python benchmarks/bench_catalog_read.py                 # 20,000 x 7,214, 1.2 GB each
    python benchmarks/bench_catalog_read.py --n 2000 --rounds 2

Writes one catalog (float32 flux and errors, ids) twice, with the same numbers: as
payne_lite wrote catalogs before format version 3 (one grid as version 1: HDF5's
default file format, Fletcher-32 on the row datasets only, no string checksums) and
with :func:`payne_lite.catalog.catalog_writer` (version 3: HDF5 metadata checksums,
Fletcher-32 on every numeric dataset, the SHA-256 of the ids verified on open). Then
times opening each and reading it in chunks of ``--chunk`` rows, as fit_catalog reads
(from the page cache after the first pass: the checksums' CPU cost, not the disk's),
alternating the two, best of ``--repeat`` per round; prints the times and the ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

import payne_lite as pl
from payne_lite.catalog import catalog_writer


def _blocks(n: int, p: int, block: int = 2000):
    rng = np.random.default_rng(0)
    for s in range(0, n, block):
        m = min(block, n - s)
        f = (1 + 0.02 * rng.standard_normal((m, p))).astype(np.float32)
        ids = np.array([f"2M{i:08d}+{i:07d}" for i in range(s, s + m)])
        yield s, f, np.full_like(f, 0.02), ids


def write_both(folder: Path, n: int, p: int) -> tuple[Path, Path]:
    wave = np.linspace(15100.0, 16900.0, p)
    old, new = folder / "v1.h5", folder / "v3.h5"
    rows = max(1, (1 << 20) // (p * 4))  # the writer's 1 MB chunks of whole rows
    with h5py.File(old, "w") as f:  # the layout written before version 3
        f.attrs["format"], f.attrs["format_version"] = "payne_lite.Catalog", 1
        f.attrs["creator"], f.attrs["meta"] = "payne_lite", "{}"
        f["wavelength"] = wave
        kw = dict(maxshape=(None, p), chunks=(rows, p), fletcher32=True)
        sets = {
            k: f.create_dataset(k, (0, p), np.float32, **kw)
            for k in ("flux", "flux_err")
        }
        sets["ids"] = f.create_dataset("ids", (0,), h5py.string_dtype(),
                                       maxshape=(None,), chunks=(max(rows, 1024),))  # fmt: skip
        for s, fl, er, ids in _blocks(n, p):
            for k, a in (("flux", fl), ("flux_err", er), ("ids", ids.astype(object))):
                sets[k].resize(s + len(fl), axis=0)
                sets[k][s:] = a
    with catalog_writer(new, wave, with_ids=True) as w:
        for _, fl, er, ids in _blocks(n, p):
            w.append(fl, er, ids=ids)
    return old, new


def read_all(path: Path, chunk: int) -> tuple[float, float]:
    """(seconds to open, seconds to open and read every chunk)."""
    t0 = time.perf_counter()
    with pl.open_catalog(path) as cat:
        t1 = time.perf_counter()
        for s in range(0, len(cat), chunk):
            c = cat.read(s, min(s + chunk, len(cat)))
            assert c.ids is not None and c.flux.shape[0] > 0
    return t1 - t0, time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=20_000, help="spectra")
    ap.add_argument("--pixels", type=int, default=7214)
    ap.add_argument("--chunk", type=int, default=512, help="rows per read")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=4)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old, new = write_both(Path(tmp), args.n, args.pixels)
        print(f"{args.n} spectra x {args.pixels} pixels: version 1 "
              f"{old.stat().st_size / 1e9:.2f} GB, version 3 "
              f"{new.stat().st_size / 1e9:.2f} GB")  # fmt: skip
        for path in (old, new):
            read_all(path, args.chunk)  # into the page cache
        totals = {old: [], new: []}
        for r in range(args.rounds):
            for path in (old, new):
                runs = [read_all(path, args.chunk) for _ in range(args.repeat)]
                best = [min(x) for x in zip(*runs, strict=True)]
                totals[path].append(best)
                print(f"  round {r + 1}, version {path.stem[1]}: open "
                      f"{best[0] * 1e3:.1f} ms, open + read {best[1]:.3f} s")  # fmt: skip
        med = {p: np.median(np.array(v), axis=0) for p, v in totals.items()}
        print(f"median open + read: version 1 {med[old][1]:.3f} s, version 3 "
              f"{med[new][1]:.3f} s, ratio {med[new][1] / med[old][1]:.3f}; open "
              f"{med[old][0] * 1e3:.1f} -> {med[new][0] * 1e3:.1f} ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
