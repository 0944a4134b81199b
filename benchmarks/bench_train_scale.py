"""Training at scale, measured (issue 19 part 4): LM time against pixels and spectra,
the projected time of a 10^5-pixel, 10^4-spectrum grid, memory, and the multi-device
path on simulated CPU devices.

Every case runs ``train_emulator`` (LM, ``--hidden`` units, ``--iters`` iterations with
early stopping off) on a built-in synthesizer grid in a fresh child process, so that
its peak resident memory (``ru_maxrss``) and compilation are its own. Time per
iteration is taken from the run's history after the first iteration (which includes
compilation): the median over the later iterations, and their minimum (the least
disturbed by other processes on a shared machine). A child run with
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` shards the pixel axis over N
simulated CPU devices (the GPU-node code path; on a 2-core machine it measures that the
path works and what it costs, not a speed-up).

Projection: a least-squares power law ``t_iter = a * n_pix^p * n_spec^q`` fitted to the
single-device cases' minimum time per iteration, evaluated at 10^5 pixels and 10^4
spectra (the training share, 0.8 of them), times ``--project-iter`` iterations (300,
``training/gpu_node.json``'s ``max_iter``, an upper bound as pixels stop early); the
LM Jacobian's memory per device is ``n_train * pixel_batch / n_dev * n_par * 4`` bytes.

    python benchmarks/bench_train_scale.py                     # ~5 min on 2 cores
    python benchmarks/bench_train_scale.py --pixels 64 256 --spectra 250 500 --iters 5

Prints Markdown tables; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, resource, sys, time
import jax, numpy as np
import payne_lite as pl
from payne_lite.grid import synth
n_pix, n_spec, hidden, iters, pixel_batch = (int(v) for v in sys.argv[1:6])
wave = synth.default_wavelength()[:n_pix]
grid = synth.make_grid(n_spec, wavelength=wave, seed=0, progress=False)
rss_grid = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
t0 = time.perf_counter()
emu = pl.train_emulator(grid, hidden=hidden, max_iter=iters, patience=10**6,
                        max_restarts=0, pixel_batch=pixel_batch, progress=False)
total = time.perf_counter() - t0
sec = np.asarray(emu.history["seconds"])
stats = [d.memory_stats() for d in jax.devices()]
print(json.dumps({
    "n_pix": n_pix, "n_spec": n_spec, "n_train": emu.meta["n_train"],
    "n_dev": jax.device_count(), "iters": int(sec.size),
    "first_iter_s": float(sec[0]),
    "s_per_iter": float(np.median(np.diff(sec))),
    "s_per_iter_min": float(np.min(np.diff(sec))),
    "total_s": total,
    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_after_grid_mb": rss_grid,
    "device_peak_bytes": [None if s is None else s.get("peak_bytes_in_use")
                          for s in stats],
}))
"""


def run_case(n_pix, n_spec, args, n_dev=1, timeout=3600) -> dict:
    """One training in a child process; ``{"hung": True, ...}`` after ``timeout`` s."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n_dev}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    argv = [n_pix, n_spec, args.hidden, args.iters, args.pixel_batch]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, *map(str, argv)],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        print(f"  {n_pix:>6} px {n_spec:>6} spectra {n_dev} dev: no result after "
              f"{timeout} s (killed)", flush=True)  # fmt: skip
        return {"n_pix": n_pix, "n_spec": n_spec, "n_dev": n_dev, "hung": True,
                "timeout_s": timeout}  # fmt: skip
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {n_pix:>6} px {n_spec:>6} spectra {n_dev} dev: "
        f"{row['s_per_iter'] * 1e3:8.1f} ms/iter, peak RSS {row['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return row


def project(rows, n_pix, n_train, iters) -> dict:
    """Power law ``t = a n_pix^p n_train^q`` fitted in log space, evaluated."""
    x = np.array([[1.0, np.log(r["n_pix"]), np.log(r["n_train"])] for r in rows])
    y = np.log([r["s_per_iter_min"] for r in rows])
    (la, p, q), *_ = np.linalg.lstsq(x, y, rcond=None)
    t_iter = float(np.exp(la + p * np.log(n_pix) + q * np.log(n_train)))
    return {"p_pixels": float(p), "q_spectra": float(q), "s_per_iter": t_iter,
            "hours": t_iter * iters / 3600}  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pixels", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--spectra", type=int, nargs="+", default=[500, 1000, 2000, 4000])
    p.add_argument("--base-pixels", type=int, default=512)
    p.add_argument("--base-spectra", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=10)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--pixel-batch", type=int, default=256)
    p.add_argument("--devices", type=int, default=4)
    p.add_argument("--project-iter", type=int, default=300)
    p.add_argument("--multi-size", type=int, nargs=2, default=[64, 1000],
                   metavar=("PIXELS", "SPECTRA"), help="the multi-device case")  # fmt: skip
    p.add_argument("--multi-large", type=int, nargs=2, default=[256, 1000],
                   metavar=("PIXELS", "SPECTRA"),
                   help="a larger multi-device case (hung when LAPACK got batches)")  # fmt: skip
    p.add_argument("--multi-timeout", type=int, default=300)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    print("pixels sweep", flush=True)
    by_pix = [run_case(n, args.base_spectra, args) for n in args.pixels]
    print("spectra sweep", flush=True)
    by_spec = [run_case(args.base_pixels, n, args) for n in args.spectra]
    print(f"{args.devices} simulated CPU devices", flush=True)
    mp, ms = args.multi_size
    multi = [
        run_case(mp, ms, args, n_dev=args.devices, timeout=args.multi_timeout),
        run_case(mp, ms, args, n_dev=1),
    ]
    if args.multi_large:
        lp, ls = args.multi_large
        multi.append(
            run_case(lp, ls, args, n_dev=args.devices, timeout=args.multi_timeout)
        )
    rows = by_pix + by_spec
    proj = project(rows, 100_000, 8_000, args.project_iter)
    n_par = (5 + 1) * args.hidden + args.hidden + 1
    jac_gb = 8_000 * 2048 / 4 * n_par * 4 / 1e9

    print("\n| pixels | spectra (train) | devices | ms / LM iteration (median, min) "
          "| first iteration (compile) s | peak RSS MB | device peak bytes |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows + multi:
        if r.get("hung"):
            print(f"| {r['n_pix']} | {r['n_spec']} | {r['n_dev']} | no result in "
                  f"{r['timeout_s']} s (killed) | | | |")  # fmt: skip
            continue
        dev = r["device_peak_bytes"]
        dev = "n/a (CPU)" if all(d is None for d in dev) else ", ".join(map(str, dev))
        print(
            f"| {r['n_pix']} | {r['n_spec']} ({r['n_train']}) | {r['n_dev']} | "
            f"{r['s_per_iter'] * 1e3:.0f}, {r['s_per_iter_min'] * 1e3:.0f} | "
            f"{r['first_iter_s']:.1f} | "
            f"{r['peak_rss_mb']:.0f} | {dev} |"
        )
    print(
        f"\nfit: t_iter ~ n_pix^{proj['p_pixels']:.2f} n_train^{proj['q_spectra']:.2f}"
        f"; projected 10^5 px x 10^4 spectra (8,000 train) on this CPU: "
        f"{proj['s_per_iter']:.0f} s / iteration, {proj['hours']:.1f} h for "
        f"{args.project_iter} iterations; LM Jacobian per device with pixel_batch "
        f"2048 on 4 devices: {jac_gb:.2f} GB"
    )
    out = {"args": vars(args) | {"json": str(args.json)}, "rows": rows,
           "multi_device": multi, "projection": proj, "jacobian_gb_per_device":
           jac_gb}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
