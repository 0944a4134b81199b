"""Catalog benchmark: fit_catalog on a large HDF5 catalog in bounded memory.

    python benchmarks/bench_catalog.py --n 2000           # a few minutes
    python benchmarks/bench_catalog.py                    # 20,000 spectra (long)
    python benchmarks/bench_catalog.py --n 2000 --json out.json --keep

What it does (issue 3, "Fitter", item 8: "fit_catalog on a 20,000-spectrum HDF5 file
runs in bounded memory (report the peak) with a progress bar, and its output equals
fit on the same arrays"):

1. Writes an ``--n``-spectrum catalog (``payne_lite.catalog.catalog_writer``, in blocks,
   so writing is bounded too): noiseless spectra of the real 5-label Payne network
   (``pl.datasets.payne_apogee()``; ``--emulator default`` or without that data:
   data/default_emulator.h5) at labels uniform in the middle 80 % of the box, rest
   frame, plus Gaussian noise of sigma = 1/``--snr``; float32 flux and errors, ids,
   and the APOGEE pixel mask stored as the per-spectrum mask (Payne network only).
2. Runs ``fit_catalog(catalog.h5, results.fits, emu, chunk_size=...)`` in a fresh
   child process (with its progress bar) and reports that process's peak resident
   memory (``ru_maxrss`` from ``resource.getrusage(RUSAGE_CHILDREN)``), its resident
   memory after imports and emulator load, and the peak of Python/NumPy allocations
   (``tracemalloc``), next to the catalog's size on disk and as arrays in memory.
3. Fits the first ``--check`` spectra with ``fit`` on arrays (read back from the
   catalog) and compares them with the same rows of the results file: integer and
   flag columns exactly, labels and rv within 1e-2 of their 1-sigma errors (the
   fitter's convergence tolerance; spectra at other positions of a float32 batch can
   round differently), and reports how many rows are bit-identical.

Times include JAX compilation (one batch shape per run, plus the last chunk's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EMULATOR = ROOT / "data" / "default_emulator.h5"
BOX_FRACTION = 0.8
BLOCK = 1000  # spectra generated and appended at a time
COMPARE_TOL = 1e-2  # |fit_catalog - fit| / sigma allowed for labels and rv


def payne_available() -> bool:
    """Whether the real Payne/APOGEE example data is installed."""
    import payne_lite as pl

    try:
        pl.datasets.payne_apogee()
    except FileNotFoundError:
        return False
    return True


def load_emulator(which: str):
    """(emulator, pixel mask or None, description)."""
    import payne_lite as pl

    if which == "payne":
        d = pl.datasets.payne_apogee()
        return d.emulator(), d.mask, "real 5-label Payne network (APOGEE, 7214 pixels)"
    emu = pl.Emulator.load(DEFAULT_EMULATOR)
    return emu, None, f"default emulator ({emu.n_pix} pixels)"


def rss_now_mb() -> float:
    """Current resident set size [MB] (Linux /proc)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def maxrss_mb(who) -> float:
    """ru_maxrss [MB] (kilobytes on Linux)."""
    return resource.getrusage(who).ru_maxrss / 1e3


def write_test_catalog(path: Path, which: str, n: int, snr: float, seed: int) -> dict:
    from payne_lite.catalog import catalog_writer

    emu, mask, what = load_emulator(which)
    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    margin = 0.5 * (1.0 - BOX_FRACTION)
    t0 = time.perf_counter()
    with catalog_writer(
        path,
        emu.wavelength,
        with_mask=mask is not None,
        with_ids=True,
        meta={"bench": "bench_catalog", "emulator": what, "snr": snr, "seed": seed},
        overwrite=True,
    ) as w:
        for start in range(0, n, BLOCK):
            m = min(BLOCK, n - start)
            labels = lo + (hi - lo) * rng.uniform(margin, 1.0 - margin, (m, len(lo)))
            clean = emu.predict(labels).astype(np.float64)
            err = np.full(clean.shape, 1.0 / snr, np.float32)
            flux = (clean + rng.normal(size=clean.shape) / snr).astype(np.float32)
            ids = [f"sim{start + i:07d}" for i in range(m)]
            w.append(
                flux,
                err,
                mask=None if mask is None else np.broadcast_to(mask, flux.shape),
                ids=ids,
            )
    return {
        "emulator": what,
        "n_spec": n,
        "n_pix": int(emu.n_pix),
        "snr": snr,
        "write_seconds": round(time.perf_counter() - t0, 1),
        "catalog_bytes_on_disk": path.stat().st_size,
        "catalog_bytes_in_memory": n * emu.n_pix * (4 + 4 + (mask is not None)),
    }


def child_fit(catalog: Path, results: Path, which: str, chunk_size: int) -> None:
    """Runs in the child process: fit_catalog with memory probes; JSON on stdout."""
    import tracemalloc

    import payne_lite as pl

    emu, _, _ = load_emulator(which)
    rss_start = rss_now_mb()
    tracemalloc.start()
    t0 = time.perf_counter()
    table = pl.fit_catalog(
        catalog, results, emu, chunk_size=chunk_size, overwrite=True, progress=True
    )
    seconds = time.perf_counter() - t0
    _, py_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(
        json.dumps(
            {
                "fit_seconds": round(seconds, 1),
                "seconds_per_spectrum": seconds / len(table),
                "rss_after_imports_mb": round(rss_start, 1),
                "tracemalloc_peak_mb": round(py_peak / 1e6, 1),
                "n_converged": int(np.count_nonzero(table["converged"])),
                "n_flagged": int(np.count_nonzero(table["flags"])),
            }
        )
    )


def compare(catalog: Path, results: Path, which: str, n_check: int, chunk: int):
    """fit on the first n_check rows as arrays vs the same rows of the results."""
    import payne_lite as pl

    emu, _, _ = load_emulator(which)
    with pl.open_catalog(catalog) as cat:
        part = cat.read(0, min(n_check, len(cat)))
    t0 = time.perf_counter()
    ref = pl.fit(part.flux, part.flux_err, emu, mask=part.mask)
    seconds = time.perf_counter() - t0
    got = pl.read_results(results)[: len(ref)]
    assert list(got["id"]) == list(part.ids), "ids differ"
    out = {"n_check": len(ref), "check_fit_seconds": round(seconds, 1)}
    identical = np.ones(len(ref), bool)
    worst = {}
    ok = True
    for name in ref.colnames:
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        same = a == b
        if a.dtype.kind == "f":
            same = same | (np.isnan(a) & np.isnan(b))
        identical &= same.reshape(len(ref), -1).all(axis=1)
        if a.dtype.kind != "f":
            ok &= bool(same.all())
            if not same.all():
                worst[name] = f"{int(np.count_nonzero(~same))} rows differ"
        elif f"{name}_err" in ref.colnames:
            sigma = np.asarray(ref[f"{name}_err"])
            d = np.where(np.isnan(a) & np.isnan(b), 0.0, np.abs(a - b) / sigma)
            worst[name] = float(np.nanmax(d))
            ok &= bool(np.all(d <= COMPARE_TOL))
    out["rows_bit_identical"] = int(np.count_nonzero(identical))
    out["max_abs_diff_in_sigma"] = worst
    out["equal_to_fit"] = ok
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=20_000, help="spectra in the catalog")
    ap.add_argument("--chunk-size", type=int, default=None, help="fit_catalog chunk")
    ap.add_argument("--check", type=int, default=1000, help="rows compared with fit")
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--emulator",
        choices=("payne", "default"),
        default="payne" if payne_available() else "default",
        help="payne = the real Payne network (payne_lite's example data)",
    )
    ap.add_argument(
        "--out-dir", type=Path, default=ROOT / "benchmarks" / "results" / "catalog"
    )
    ap.add_argument("--keep", action="store_true", help="keep the catalog file")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument(
        "--child", nargs=2, metavar=("CATALOG", "RESULTS"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)
    from payne_lite.catalog import DEFAULT_CHUNK_SIZE

    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    if args.child:
        child_fit(Path(args.child[0]), Path(args.child[1]), args.emulator, chunk)
        return 0

    args.out_dir.mkdir(parents=True, exist_ok=True)
    catalog = args.out_dir / f"catalog_{args.n}.h5"
    results = args.out_dir / f"results_{args.n}.fits"
    res = write_test_catalog(catalog, args.emulator, args.n, args.snr, args.seed)
    res["chunk_size"] = chunk
    print(
        f"catalog: {args.n} spectra x {res['n_pix']} pixels ({res['emulator']}), "
        f"{res['catalog_bytes_on_disk'] / 1e6:.0f} MB on disk, "
        f"{res['catalog_bytes_in_memory'] / 1e6:.0f} MB as arrays; "
        f"written in {res['write_seconds']} s",
        flush=True,
    )
    cmd = [sys.executable, __file__, "--child", str(catalog), str(results)]
    cmd += ["--emulator", args.emulator, "--chunk-size", str(chunk)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    res.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    res["peak_rss_mb"] = round(maxrss_mb(resource.RUSAGE_CHILDREN), 1)
    res["results_bytes"] = results.stat().st_size
    print(
        f"fit_catalog (chunk_size {chunk}): {res['fit_seconds']} s, "
        f"{res['seconds_per_spectrum'] * 1e3:.1f} ms per spectrum; "
        f"{res['n_converged']} converged, {res['n_flagged']} flagged\n"
        f"  peak RSS {res['peak_rss_mb']:.0f} MB (after imports and emulator "
        f"{res['rss_after_imports_mb']:.0f} MB); tracemalloc peak "
        f"{res['tracemalloc_peak_mb']:.0f} MB; catalog "
        f"{res['catalog_bytes_in_memory'] / 1e6:.0f} MB as arrays"
    )
    if args.check > 0:
        res.update(compare(catalog, results, args.emulator, args.check, chunk))
        print(
            f"fit on the first {res['n_check']} rows as arrays vs fit_catalog: "
            f"{'EQUAL' if res['equal_to_fit'] else 'DIFFERENT'} "
            f"({res['rows_bit_identical']} rows bit-identical; max |diff|/sigma "
            + ", ".join(
                f"{k} {v:.1e}" if isinstance(v, float) else f"{k} {v}"
                for k, v in res["max_abs_diff_in_sigma"].items()
            )
            + ")"
        )
    if not args.keep:
        catalog.unlink()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2))
    return 0 if res.get("equal_to_fit", True) else 1


if __name__ == "__main__":
    sys.exit(main())
