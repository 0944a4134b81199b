"""Is an emulator's validation report right? Stored cells against new held-out grids.

An emulator is trained on a built-in grid (its report is written from the held-out
split); then ``Emulator.validate`` recomputes the report on several new grids drawn
from the same box (other seeds). For every cell of the label, face-distance and
edge-count tables with at least ``--min-count`` spectra in both, ``z = (stored -
new) / sqrt(noise_stored^2 + noise_new^2)``, the noise being each median's
order-statistic 1-sigma. If the report's medians and their noise are right, z is
about unit normal: 68 % within 1, 95 % within 2. Also: the time the held-out
statistics (predictions of every held-out spectrum) and the report's tables take in
training.

    python benchmarks/bench_report.py                    # 2000 spectra, 200 pixels
    python benchmarks/bench_report.py --n-train 600 --n-pix 60 --n-new 2

Prints a Markdown table, and JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.emulator import _train
from payne_lite.grid import synth


def cell_z(stored, new, min_count: int) -> np.ndarray:
    out = []
    for a, b in (
        (stored.label_bins(), new.label_bins()),
        (stored.edge_bins(), new.edge_bins()),
        (stored.corner_bins(), new.corner_bins()),
    ):
        ok = (a.count >= min_count) & (b.count >= min_count)
        out.append(((a.median - b.median) / np.hypot(a.noise, b.noise))[ok])
    return np.concatenate(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-pix", type=int, default=200)
    p.add_argument("--n-new", type=int, default=3, help="new held-out grids")
    p.add_argument("--n-held", type=int, default=1000, help="spectra per new grid")
    p.add_argument("--min-count", type=int, default=10)
    p.add_argument("--max-iter", type=int, default=60)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    wave = synth.default_wavelength()[2000 : 2000 + args.n_pix]
    grid = synth.make_grid(args.n_train, wavelength=wave, seed=1, progress=False)
    spent = {"_report": 0.0, "_held_out_stats": 0.0}
    originals = {name: getattr(_train, name) for name in spent}

    def timer(name):
        def timed(*a, **k):
            t = time.perf_counter()
            out = originals[name](*a, **k)
            spent[name] += time.perf_counter() - t
            return out

        return timed

    for name in spent:
        setattr(_train, name, timer(name))
    t0 = time.perf_counter()
    try:
        emu = pl.train_emulator(grid, hidden=10, max_iter=args.max_iter, progress=False)
    finally:
        for name, fn in originals.items():
            setattr(_train, name, fn)
    total = time.perf_counter() - t0
    rep = emu.report
    rows = []
    zs = []
    for k in range(args.n_new):
        new = synth.make_grid(
            args.n_held, wavelength=wave, seed=100 + k, progress=False
        )
        z = cell_z(rep, emu.validate(new), args.min_count)
        zs.append(z)
        rows.append(
            dict(
                grid=k,
                n_cells=int(z.size),
                within_1=float(np.mean(np.abs(z) < 1)),
                within_2=float(np.mean(np.abs(z) < 2)),
                max_abs_z=float(np.max(np.abs(z))),
            )
        )
    allz = np.concatenate(zs)
    result = dict(
        n_train=args.n_train,
        n_pix=args.n_pix,
        n_valid=rep.n_spectra,
        median_error=rep.median_error,
        poor_label_cells=int(rep.poor_cells()[0].sum()),
        train_seconds=total,
        report_tables_seconds=spent["_report"],
        held_out_stats_seconds=spent["_held_out_stats"],
        per_grid=rows,
        within_1=float(np.mean(np.abs(allz) < 1)),
        within_2=float(np.mean(np.abs(allz) < 2)),
        std_z=float(np.std(allz)),
    )
    print(
        f"emulator: {args.n_train} spectra x {args.n_pix} pixels, "
        f"{rep.n_spectra} held out; median error {rep.median_error:.2e}; "
        f"{result['poor_label_cells']} poor label bins"
    )
    print(
        f"training {total:.1f} s, of which the held-out statistics (all held-out "
        f"predictions, pixel_error, error_basis, |error| for the report) "
        f"{spent['_held_out_stats']:.2f} s and the report's tables "
        f"{spent['_report']:.2f} s\n"
    )
    print("| new grid | cells | |z| < 1 | |z| < 2 | max |z| |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['grid']} | {r['n_cells']} | {r['within_1']:.2f} | "
            f"{r['within_2']:.2f} | {r['max_abs_z']:.2f} |"
        )
    print(
        f"| all | {allz.size} | {result['within_1']:.2f} | {result['within_2']:.2f} "
        f"| {np.max(np.abs(allz)):.2f} |\n\nstd of z: {result['std_z']:.2f} "
        "(1 if the medians and their noise are right; 0.68 / 0.95 within 1 / 2)"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
