"""The predictive checks on the real spectra that ship with payne_lite (issue 18).

Fits the combined spectrum of the single dwarf 2M13012770+5754582 and the three
visits of the double-lined binary 2M06133561+2433362 with The Payne's APOGEE
network (rv free, its mask), then runs ``pl.companion_search`` on them and on mocks
of the same network (noise alone, and twins injected at light ratios 0.1, 0.3 and
0.5, 40-150 km/s away, shifted by a Lanczos-8 sinc), and prints the check columns:

    python benchmarks/bench_checks_real.py            # ~20 s
    python benchmarks/bench_checks_real.py --n 40 --snr 100 200
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.fitting import FLAG_COMPANION

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_emulator_error import _shift  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=40, help="mocks per S/N (a quarter each)")
    ap.add_argument("--snr", type=float, nargs="+", default=[100.0, 200.0])
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    d = pl.datasets.payne_apogee()
    emu, mask = d.emulator(), d.mask
    wave = np.asarray(emu.wavelength, np.float64)
    single, visits = d.combined_spectrum(), d.visits()
    rng = np.random.default_rng(args.seed)
    ratios = np.array([0.0, 0.1, 0.3, 0.5])
    snr = np.repeat(args.snr, args.n)
    m = snr.size
    labels = emu.unscale(rng.uniform(-0.4, 0.4, (m, emu.n_labels)))
    rest = np.asarray(emu.predict(labels), np.float64)
    rv1 = rng.uniform(-50.0, 50.0, m)
    q = np.tile(ratios, m // ratios.size + 1)[:m]
    dv = rng.choice([-1.0, 1.0], m) * rng.uniform(40.0, 150.0, m)
    mocks = np.stack(
        [
            (_shift(wave, f, a) + r * _shift(wave, f, a + b)) / (1.0 + r)
            for f, a, b, r in zip(rest, rv1, dv, q, strict=True)
        ]
    )
    mocks += rng.standard_normal(mocks.shape) / snr[:, None]
    flux = np.vstack([single.flux[None], visits.flux, mocks])
    err = np.vstack(
        [single.flux_err[None], visits.flux_err, np.ones_like(mocks) / snr[:, None]]
    )
    t = pl.fit(flux, err, emu, mask=mask, return_model=True)
    t0 = time.perf_counter()
    comp = pl.companion_search(flux, err, t, wave, mask=mask)
    secs = (time.perf_counter() - t0) / len(flux)
    comp.add_to(t)
    s_n = np.median(np.abs(flux) / err, axis=1)
    names = [f"{single.star}, combined (single)"] + [
        f"{visits.star}, visit {i + 1} (binary)" for i in range(len(visits.flux))
    ]
    print("| spectrum | S/N | chi2_red | chi2_pvalue | misfit beyond noise | max_dip "
          "| companion_depth | companion_dv | companion_nsigma | flags |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, name in enumerate(names):
        misfit = np.sqrt(max(t["chi2_red"][i] - 1.0, 0.0)) / s_n[i]
        print(
            f"| {name} | {s_n[i]:.0f} | {t['chi2_red'][i]:.2f} | "
            f"{t['chi2_pvalue'][i]:.2g} | {100 * misfit:.1f} % | {t['max_dip'][i]:.1f} | "
            f"{comp.depth[i]:.3f} | {comp.dv[i]:+.0f} km/s | {comp.nsigma[i]:.1f} | "
            f"{t['flags'][i]} |"
        )
    print(f"\nmocks of the network ({m}: S/N {', '.join(f'{s:g}' for s in args.snr)}):")
    print("| twin's light ratio | n | companion_depth median [min, max] | "
          "flagged (bit 1024) | abs(dv - truth) median | nsigma median |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    out = {"real": {n: float(comp.depth[i]) for i, n in enumerate(names)}}
    k = len(names)
    for r in ratios:
        s = np.flatnonzero(q == r) + k
        flagged = np.mean((np.asarray(t["flags"])[s] & FLAG_COMPANION) != 0)
        off = "" if r == 0 else f"{np.median(np.abs(comp.dv[s] - dv[s - k])):.1f} km/s"
        print(f"| {r:g} | {s.size} | {np.median(comp.depth[s]):.3f} "
              f"[{comp.depth[s].min():.3f}, {comp.depth[s].max():.3f}] | "
              f"{flagged:.2f} | {off} | {np.median(comp.nsigma[s]):.1f} |")  # fmt: skip
        out[f"ratio_{r:g}"] = float(np.median(comp.depth[s]))
    print(f"\ncompanion_search: {1e3 * secs:.2f} ms a spectrum (host, NumPy)")
    return out


if __name__ == "__main__":
    main()
