"""Memory that does not grow: peak resident memory of fit_catalog against catalog size.

    python benchmarks/bench_memory.py --sizes 5000,20000     # ~10 min on 2 cores
    python benchmarks/bench_memory.py --sizes 100000         # the issue's size (long)
    python benchmarks/bench_memory.py --sizes 2000 --json mem.json

Issue 17, part 7: "a 100,000-spectrum catalog (stream it from a generator into the
catalog file) fits with peak resident memory under 1.5 GB, sampled along the run,
flat after the first chunks".

For each size: writes the catalog in blocks of 1,000 spectra
(``bench_catalog.write_test_catalog``: noisy spectra of the real 5-label Payne network,
7214 APOGEE pixels, float32, ids and the APOGEE mask; the generator holds one block),
then runs ``fit_catalog`` on it in a fresh child process. A thread of the child samples
its resident memory (``/proc/self/statm``) every ``--every`` seconds with the chunks
recorded so far (the parts manifest), and the child reports its peak (``ru_maxrss``).
Prints, per size: the peak, the resident memory once the first chunk is recorded,
after a quarter and half of the chunks and at the end (the final table written), and
the growth from the first chunk to the end (flat: a few MB); then the curve peak
against size. The catalog is deleted
after its run (``--keep`` keeps it).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from .bench_catalog import (  # noqa: E402
    ROOT,
    load_emulator,
    payne_available,
    rss_now_mb,
    write_test_catalog,
)

LIMIT_MB = 1500.0  # the target at 100,000 spectra


def _chunks_done(manifest: Path) -> int:
    try:
        return len(json.loads(manifest.read_text())["done"])
    except (OSError, ValueError, KeyError):
        return 0


def child(catalog: Path, results: Path, which: str, chunk: int, every: float) -> None:
    """In the child: fit_catalog with an RSS sampler; JSON on stdout."""
    import payne_lite as pl

    emu, _, _ = load_emulator(which)
    manifest = pl.catalog.parts_folder(results) / "manifest.json"
    samples, stop = [], threading.Event()
    t0 = time.perf_counter()

    def sample():
        while not stop.is_set():
            samples.append(
                (round(time.perf_counter() - t0, 2), _chunks_done(manifest),
                 round(rss_now_mb(), 1))
            )  # fmt: skip
            stop.wait(every)

    rss_start = rss_now_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    table = pl.fit_catalog(
        catalog, results, emu, chunk_size=chunk, overwrite=True, progress=False
    )
    stop.set()
    sampler.join()
    samples.append((round(time.perf_counter() - t0, 2), -1, round(rss_now_mb(), 1)))
    print(
        json.dumps(
            {
                "fit_seconds": round(time.perf_counter() - t0, 1),
                "n_rows": len(table),
                "rss_after_imports_mb": round(rss_start, 1),
                "samples": samples,
                "maxrss_mb": round(  # KiB on Linux; MB = 1e6 bytes, as statm here
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6, 1
                ),
            }
        )
    )


def summarize(res: dict, n_chunks: int) -> dict:
    """RSS once 1, a quarter and half of the chunks were recorded (the first sample
    at or after each) and at the end, and the growth from the first chunk on."""
    samples = res["samples"]
    at = {}
    for label, k in (("1", 1), ("1/4", n_chunks // 4), ("1/2", n_chunks // 2)):
        hit = [s for s in samples if s[1] >= max(k, 1)]
        at[label] = hit[0][2] if hit else None
    at["end"] = samples[-1][2]  # after fit_catalog returned (final table written)
    during = [s[2] for s in samples if s[1] >= 1 or s[1] == -1]
    return {
        "rss_at_chunks_mb": at,
        "max_sampled_after_first_chunk_mb": max(during) if during else None,
        "growth_after_first_chunk_mb": (
            round(max(during) - at["1"], 1) if during and at["1"] else None
        ),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="5000,20000", help="comma-separated")
    ap.add_argument("--chunk-size", type=int, default=None)
    ap.add_argument("--every", type=float, default=1.0, help="sampling period [s]")
    ap.add_argument(
        "--emulator",
        choices=("payne", "default"),
        default="payne" if payne_available() else "default",
    )
    ap.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--keep", action="store_true", help="keep the catalogs")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    from payne_lite.catalog import DEFAULT_CHUNK_SIZE

    chunk = args.chunk_size or DEFAULT_CHUNK_SIZE
    if args.child:
        child(Path(args.child[0]), Path(args.child[1]), args.emulator, chunk,
              args.every)  # fmt: skip
        return 0
    folder = args.out_dir / "memory"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        catalog, results = folder / f"catalog_{n}.h5", folder / f"results_{n}.fits"
        info = write_test_catalog(catalog, args.emulator, n, 50.0, 0)
        print(f"{n} spectra: catalog {info['catalog_bytes_on_disk'] / 1e6:.0f} MB on "
              f"disk, written in {info['write_seconds']} s", flush=True)  # fmt: skip
        cmd = [sys.executable, __file__, "--child", str(catalog), str(results),
               "--emulator", args.emulator, "--chunk-size", str(chunk),
               "--every", str(args.every)]  # fmt: skip
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        n_chunks = -(-n // chunk)
        row = {"n_spec": n, "chunk_size": chunk, "n_chunks": n_chunks, **info,
               "fit_seconds": res["fit_seconds"], "peak_rss_mb": res["maxrss_mb"],
               "rss_after_imports_mb": res["rss_after_imports_mb"],
               **summarize(res, n_chunks), "samples": res["samples"]}  # fmt: skip
        rows.append(row)
        print(f"  fit {res['fit_seconds']} s; peak RSS {row['peak_rss_mb']:.0f} MB; "
              f"RSS at chunks {row['rss_at_chunks_mb']} MB; growth after the first "
              f"chunk {row['growth_after_first_chunk_mb']} MB", flush=True)  # fmt: skip
        results.unlink()
        if not args.keep:
            catalog.unlink()
    print("\n| spectra | catalog on disk [MB] | fit [s] | peak RSS [MB] | RSS after "
          "1st chunk [MB] | growth after 1st chunk [MB] |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n_spec']} | {r['catalog_bytes_on_disk'] / 1e6:.0f} | "
              f"{r['fit_seconds']} | {r['peak_rss_mb']:.0f} | "
              f"{r['rss_at_chunks_mb']['1']} | {r['growth_after_first_chunk_mb']} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    ok = all(r["peak_rss_mb"] < LIMIT_MB for r in rows)
    print(f"peak RSS < {LIMIT_MB:.0f} MB: {'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
