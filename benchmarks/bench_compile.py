"""Compilation benchmark: what a new process and a new batch size cost before fitting.

    python benchmarks/bench_compile.py                 # both parts, ~3 min
    python benchmarks/bench_compile.py first-fit       # cold / warm cache, fresh processes
    python benchmarks/bench_compile.py batch-sizes --json out.json
    python benchmarks/bench_compile.py concurrent      # two fresh processes at once

``first-fit``: a fresh Python process loads the real APOGEE Payne network
(``pl.datasets.payne_apogee()``) and fits one mock spectrum (S/N 50), three ways in
this run: with the persistent compilation cache off (``PAYNE_LITE_COMPILATION_CACHE
=off``), with an empty cache directory (cold: compiles and writes), and again with
that directory (warm: loads). Each process prints its import, first-fit and
second-fit seconds and its compilation counts (``jax.monitoring``); the table shows
the median of ``--repeats`` processes per way.

``concurrent``: the cache-off first fit of ``first-fit`` in one process alone, then in
as many processes at once as there are CPUs (``--repeats`` rounds, interleaved):
processes that compile at the same time should each take about as long as one
alone (until 2026-12-06 every process compiled on the lowest CPU, and two at once
took 2-3x as long each).

``batch-sizes`` (one process, persistent cache off): after a warm-up fit of 4
spectra, fits of 1, 7, 300 and 1,000 mock spectra of the network (S/N 50, rv
uniform in +-250 km/s, one chunk of 200 pixels NaN per spectrum), each timed on its
first call at that size, with the compilations it caused; then the 300 again
(steady state). The baseline is The-Payne-style (``benchmarks/bench_fit.py``:
NumPy model, chi2 RV scan, one scipy ``curve_fit`` per spectrum, one core) on the
first ``--n-baseline`` of the same spectra; the ratio is spectra/s over its
spectra/s in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: The issue's test set for batch sizes: S/N, |rv| range [km/s], NaN chunk [pixels].
SNR, RV_MAX, NAN_CHUNK = 50.0, 250.0, 200
SIZES = (1, 7, 300, 1000)
#: Spectra in APOGEE DR17 (allStar), for the projected wall time.
APOGEE_DR17 = 733_901

_CHILD = r"""
import sys, time, json
t0 = time.perf_counter()
sys.path.insert(0, {root!r})
import numpy as np
import payne_lite as pl
from payne_lite._compile import CompileCounter
from benchmarks.bench_fit import load_data, make_test_set
t1 = time.perf_counter()
emu, net, amask = load_data()
lab, rv, flux, err, mask = make_test_set(net, amask, 2, {snr}, 7)
t2 = time.perf_counter()
with CompileCounter() as cc:
    pl.fit(flux[:1], err[:1], emu, mask=mask[:1])
t3 = time.perf_counter()
pl.fit(flux[1:], err[1:], emu, mask=mask[1:])
t4 = time.perf_counter()
print(json.dumps(dict(
    import_s=t1 - t0, load_s=t2 - t1, first_fit_s=t3 - t2, second_fit_s=t4 - t3,
    cache_dir=pl.compilation_cache_dir(), traces=cc.traces, compiles=cc.compiles,
    loads=cc.loads,
)))
"""


def _child(env_extra: dict) -> dict:
    return _children_at_once(1, env_extra)[0]


def bench_first_fit(repeats: int) -> dict:
    """Fresh processes: cache off, cold (empty directory), warm (the same again)."""
    runs = {"off": [], "cold": [], "warm": []}
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs["off"].append(_child({"PAYNE_LITE_COMPILATION_CACHE": "off"}))
            runs["cold"].append(_child({"PAYNE_LITE_COMPILATION_CACHE": tmp}))
            runs["warm"].append(_child({"PAYNE_LITE_COMPILATION_CACHE": tmp}))
    print(
        "\nFirst fit of one spectrum in a fresh process (real APOGEE network; "
        f"median of {repeats} processes per row, interleaved)"
    )
    print(
        f"  {'cache':<6} {'import':>7} {'load':>6} {'1st fit':>8} {'2nd fit':>8} "
        f"{'traces':>7} {'compiles':>9} {'loads':>6}"
    )
    med = {}
    for name, rs in runs.items():
        m = {k: float(np.median([r[k] for r in rs])) for k in rs[0] if k != "cache_dir"}
        med[name] = m
        print(
            f"  {name:<6} {m['import_s']:7.2f} {m['load_s']:6.2f} "
            f"{m['first_fit_s']:8.2f} {m['second_fit_s']:8.3f} {m['traces']:7.0f} "
            f"{m['compiles']:9.0f} {m['loads']:6.0f}"
        )
    ratio = med["cold"]["first_fit_s"] / med["warm"]["first_fit_s"]
    print(f"  warm cache: first fit {ratio:.1f}x faster than cold (same run)")
    return dict(median=med, runs=runs, cold_over_warm=ratio)


def _children_at_once(n: int, env_extra: dict) -> list[dict]:
    """``n`` children of :func:`_child` started together; their results."""
    env = {**os.environ, **env_extra}
    cmd = [sys.executable, "-c", _CHILD.format(root=str(ROOT), snr=SNR)]
    procs = [
        subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):  # (their stderr went to ours)
        raise RuntimeError(f"a child failed: {[p.returncode for p in procs]}")
    return [json.loads(o.strip().splitlines()[-1]) for o in outs]


def bench_concurrent(repeats: int) -> dict:
    """The cache-off first fit alone and in one process per CPU at once."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    off = {"PAYNE_LITE_COMPILATION_CACHE": "off"}
    alone, together = [], []
    for _ in range(repeats):
        alone.append(_child(off)["first_fit_s"])
        together.extend(r["first_fit_s"] for r in _children_at_once(n, off))
    a, t = float(np.median(alone)), float(np.median(together))
    print(
        f"\nFirst fit of one spectrum, cache off (median of {repeats} rounds): "
        f"one process alone {a:.1f} s; {n} processes at once {t:.1f} s each "
        f"({t / a:.2f}x one alone; {n}x the work on {n} CPUs)"
    )
    return dict(n_processes=n, alone_s=alone, together_s=together, ratio=t / a)


def _test_set(net, amask, n: int, seed: int):
    from benchmarks.bench_fit import make_test_set

    rng = np.random.default_rng(seed + 100)
    lab, rv, flux, err, mask = make_test_set(net, amask, n, SNR, seed)
    # rv uniform in +-RV_MAX: make_test_set draws +-200; rescale the draw is not
    # possible after the fact, so the spectra are made again with the wider rvs
    s = net.scale(lab)
    rv = rng.uniform(-RV_MAX, RV_MAX, n)
    clean = np.stack([net.observed(si, v) for si, v in zip(s, rv, strict=True)])
    mask = amask | ~np.isfinite(clean)  # off the chips (~net.covered) and their ends
    flux = np.where(mask, 1.0, clean) + rng.normal(0.0, 1.0 / SNR, clean.shape)
    start = rng.integers(0, flux.shape[1] - NAN_CHUNK, n)
    for i, a in enumerate(start):
        flux[i, a : a + NAN_CHUNK] = np.nan
    return lab, rv, flux, err, mask


def bench_batch_sizes(n_baseline: int) -> dict:
    import payne_lite as pl
    from benchmarks.bench_fit import Baseline, load_data
    from payne_lite._compile import CompileCounter

    pl.set_compilation_cache(None)
    emu, net, amask = load_data()
    n_max = max(SIZES)
    lab, rv, flux, err, mask = _test_set(net, amask, n_max, seed=3)
    t = time.perf_counter()
    with CompileCounter() as cc:
        pl.fit(flux[:4], err[:4], emu, mask=mask[:4])
    warm = dict(seconds=time.perf_counter() - t, traces=cc.traces, compiles=cc.compiles)
    rows = []
    for n in (*SIZES, 300):
        with CompileCounter() as cc:
            t = time.perf_counter()
            out = pl.fit(flux[:n], err[:n], emu, mask=mask[:n])
            dt = time.perf_counter() - t
        d_rv = np.asarray(out["rv"]) - rv[:n]
        rows.append(
            dict(n=n, seconds=dt, traces=cc.traces, compiles=cc.compiles,
                 rv_mad=float(np.median(np.abs(d_rv))))
        )  # fmt: skip
    base = Baseline(net)
    bmask = mask | ~np.isfinite(flux)  # scipy refuses NaN: the chunk is masked
    base.fit(flux[:2], err[:2], bmask[:2])  # warm-up (its templates)
    t = time.perf_counter()
    b = base.fit(flux[:n_baseline], err[:n_baseline], bmask[:n_baseline])
    base_rate = n_baseline / (time.perf_counter() - t)
    print(
        f"\nFits at new batch sizes in one process (cache off; warm-up fit of 4: "
        f"{warm['seconds']:.1f} s, {warm['traces']} traces, {warm['compiles']} "
        "XLA compiles)"
    )
    print(f"  {'n':>5} {'seconds':>8} {'spectra/s':>10} {'x baseline':>11} "
          f"{'traces':>7} {'compiles':>9}")  # fmt: skip
    for i, r in enumerate(rows):
        rate = r["n"] / r["seconds"]
        r["ratio"] = rate / base_rate
        tag = " (again)" if i == len(SIZES) else ""
        print(
            f"  {r['n']:5d} {r['seconds']:8.2f} {rate:10.1f} {r['ratio']:11.1f} "
            f"{r['traces']:7d} {r['compiles']:9d}{tag}"
        )
    steady = max(r["n"] / r["seconds"] for r in rows if r["n"] >= 300)
    print(
        f"  fastest rate at n >= 300: {steady:.0f} spectra/s on this machine "
        f"({os.cpu_count()} CPUs): {APOGEE_DR17 / steady / 60:.1f} min projected for "
        f"APOGEE DR17's {APOGEE_DR17:,} spectra (goal: 10 min)"
    )
    b_mad = float(np.median(np.abs(b["values"][:, -1] - rv[:n_baseline])))
    print(
        f"  baseline (The-Payne-style, {n_baseline} spectra): {base_rate:.2f} "
        f"spectra/s on one core; median |rv error| {b_mad:.3f} km/s (ours on 300: "
        f"{rows[2]['rv_mad']:.3f})"
    )
    return dict(
        warmup=warm, rows=rows, baseline_spectra_per_s=base_rate,
        projected_dr17_minutes=APOGEE_DR17 / steady / 60,
    )  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", default="all",
                    choices=["all", "first-fit", "concurrent", "batch-sizes"])  # fmt: skip
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--n-baseline", type=int, default=30)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    out = {}
    if args.what in ("all", "first-fit"):
        out["first_fit"] = bench_first_fit(args.repeats)
    if args.what in ("all", "concurrent"):
        out["concurrent"] = bench_concurrent(args.repeats)
    if args.what in ("all", "batch-sizes"):
        out["batch_sizes"] = bench_batch_sizes(args.n_baseline)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, default=float))


if __name__ == "__main__":
    main()
