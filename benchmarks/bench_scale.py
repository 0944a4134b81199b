"""Scale benchmark: fit_catalog throughput in one process, on 1 and on 2 Dask workers.

    python benchmarks/bench_scale.py                  # 4096 spectra, ~3-4 min on 2 cores
    python benchmarks/bench_scale.py --n 2048 --emulator default --json out.json

What it does (issue 8, "Scale past one machine", must show: "a benchmark reports
catalog throughput on 1 vs 2 local workers (spectra per second, ratio)"):

1. Writes an ``--n``-spectrum catalog: noisy spectra (S/N ``--snr``, float32) of the
   real 5-label Payne network (``pl.datasets.payne_apogee()``, 7214 APOGEE pixels;
   ``--emulator default`` or without that data: data/default_emulator.h5) at labels
   uniform in the middle 80 % of the box.
2. Fits it with ``fit_catalog(..., chunk_size=--chunk-size)`` in these setups:

   * ``in-process``: no Dask; ``fit`` runs its batches in threads, one per CPU;
   * ``dask 1 worker``: a LocalCluster of one worker process (fit's threads as above);
   * ``dask 2 workers``: two worker processes, each with fit's threads as above;
   * ``dask 2 workers, n_threads=1``: two processes, one fit thread each.

   Each setup runs twice: a cold run (first chunk of each worker compiles) and a
   warm run on the same workers (compiled solvers reused: XLA compilations during
   the warm run are counted and reported). Throughput = spectra / warm wall time;
   cluster start-up is timed apart.
3. Checks that every setup's results file equals the in-process one, bit for bit.

Reports spectra per second, the ratio of 2 workers to 1 worker and to in-process. On
a machine whose CPUs are SMT siblings, one process already keeps both busy with its
fit threads; what 2 workers can add is overlap of the Python/NumPy parts of a chunk
(reading, starts, the results table) with another chunk's XLA work.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"

from .bench_catalog import load_emulator, payne_available  # noqa: E402

RUN_META = ("fit_seconds", "n_chunks_resumed", "n_workers")


def make_catalog(path: Path, emu, pixel_mask, n: int, snr: float, seed: int) -> None:
    import payne_lite as pl

    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    mid, half = (lo + hi) / 2, 0.4 * (hi - lo)
    labels = rng.uniform(mid - half, mid + half, (n, emu.n_labels))
    clean = emu.predict(labels).astype(np.float64)
    err = np.full_like(clean, 1.0 / snr)
    flux = clean + err * rng.normal(size=clean.shape)
    mask = None if pixel_mask is None else np.broadcast_to(pixel_mask, flux.shape)
    pl.write_catalog(
        path,
        flux.astype(np.float32),
        err.astype(np.float32),
        emu.wavelength,
        mask=mask,
        ids=np.array([f"s{i:07d}" for i in range(n)]),
    )


def same_results(a, b) -> bool:
    if a.colnames != b.colnames or len(a) != len(b):
        return False
    for name in a.colnames:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        if x.dtype != y.dtype or not np.array_equal(
            x, y, equal_nan=x.dtype.kind == "f"
        ):
            return False
    return True


def run_setup(name, cat, emu, out_dir, *, n, chunk_size, workers, fit_kw):
    """Cold and warm fit_catalog runs of one setup (``fit_kw``: pl.LMOptions
    fields); a dict of timings."""
    import payne_lite as pl
    from payne_lite.catalog import local_client, worker_stats

    def fit(client, tag):
        out = out_dir / f"{name.replace(' ', '_').replace(',', '')}-{tag}.fits"
        t0 = time.perf_counter()
        pl.fit_catalog(
            cat, out, emu, chunk_size=chunk_size, progress=False, client=client,
            options=pl.LMOptions(**fit_kw),
        )  # fmt: skip
        return time.perf_counter() - t0, out

    res = {"setup": name, "workers": workers, **fit_kw}
    if workers == 0:
        res["startup_s"] = 0.0
        res["cold_s"], _ = fit(None, "cold")
        res["warm_s"], out = fit(None, "warm")
        res["warm_compiles"] = None
    else:
        t0 = time.perf_counter()
        with local_client(workers) as client:
            res["startup_s"] = time.perf_counter() - t0
            res["cold_s"], _ = fit(client, "cold")
            before = client.run(worker_stats)
            res["warm_s"], out = fit(client, "warm")
            after = client.run(worker_stats)
        res["warm_compiles"] = sum(
            after[w]["compiles"] - before[w]["compiles"] for w in after
        )
        res["tasks_per_worker"] = sorted(
            after[w]["tasks"] - before[w]["tasks"] for w in after
        )
    res["spectra_per_s"] = n / res["warm_s"]
    res["output"] = str(out)
    print(
        f"  {name:28s} start {res['startup_s']:5.1f} s  cold {res['cold_s']:6.1f} s  "
        f"warm {res['warm_s']:6.1f} s  {res['spectra_per_s']:7.1f} spectra/s"
        + (
            f"  (warm compiles {res['warm_compiles']}, chunks per worker "
            f"{res['tasks_per_worker']})"
            if workers
            else ""
        ),
        flush=True,
    )
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096, help="spectra in the catalog")
    ap.add_argument("--chunk-size", type=int, default=512)
    ap.add_argument("--snr", type=float, default=100.0)
    ap.add_argument(
        "--emulator",
        choices=["payne", "default"],
        default="payne" if payne_available() else "default",
    )
    ap.add_argument(
        "--setups",
        default="in-process,1,2,2t1",
        help="comma list of: in-process, 1 (worker), 2 (workers), 2t1 (2 workers, "
        "n_threads=1)",
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args(argv)

    import payne_lite as pl

    emu, pixel_mask, what = load_emulator(args.emulator)
    print(
        f"{args.n} spectra of the {what}, S/N {args.snr:g}, chunks of "
        f"{args.chunk_size}; {len(os.sched_getaffinity(0))} CPUs",
        flush=True,
    )
    known = {
        "in-process": ("in-process", 0, {}),
        "1": ("dask 1 worker", 1, {}),
        "2": ("dask 2 workers", 2, {}),
        "2t1": ("dask 2 workers, n_threads=1", 2, {"n_threads": 1}),
    }
    setups = [known[s.strip()] for s in args.setups.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        tmp = Path(tmp)
        cat = tmp / "catalog.h5"
        t0 = time.perf_counter()
        make_catalog(cat, emu, pixel_mask, args.n, args.snr, seed=1)
        print(f"  catalog written in {time.perf_counter() - t0:.1f} s", flush=True)
        results = [
            run_setup(
                name,
                cat,
                emu,
                tmp,
                n=args.n,
                chunk_size=args.chunk_size,
                workers=w,
                fit_kw=kw,
            )  # fmt: skip
            for name, w, kw in setups
        ]
        ref = pl.read_results(results[0]["output"])
        for r in results:
            r["equals_" + results[0]["setup"]] = same_results(
                pl.read_results(r["output"]), ref
            )
            del r["output"]
    by = {r["setup"]: r for r in results}
    ratios = {}
    if "dask 1 worker" in by and "dask 2 workers" in by:
        ratios["2_workers_over_1_worker"] = (
            by["dask 2 workers"]["spectra_per_s"] / by["dask 1 worker"]["spectra_per_s"]
        )
    if "in-process" in by:
        for r in results[1:]:
            ratios[f"{r['setup']}_over_in-process"] = (
                r["spectra_per_s"] / by["in-process"]["spectra_per_s"]
            )
    print("\n| setup | spectra/s (warm) | cold run [s] | cluster start [s] | "
          f"same output as {results[0]['setup']} |")  # fmt: skip
    print("|---|---|---|---|---|")
    for r in results:
        same = r["equals_" + results[0]["setup"]]
        print(
            f"| {r['setup']} | {r['spectra_per_s']:.1f} | {r['cold_s']:.1f} | "
            f"{r['startup_s']:.1f} | {'yes' if same else 'NO'} |"
        )
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "n_spec": args.n,
                    "chunk_size": args.chunk_size,
                    "emulator": what,
                    "cpus": len(os.sched_getaffinity(0)),
                    "results": results,
                    "ratios": ratios,
                },
                indent=1,
            )
        )
    return 0 if all(r["equals_" + results[0]["setup"]] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
