"""Rebuild the default MDN that ``payne-lite demo`` uses.

    python data/make_default_mdn.py            # writes data/default_mdn.h5

It is :func:`payne_lite.train_mdn` with its defaults (100,000 spectra simulated on the
fly from ``data/default_emulator.h5`` over its label box, S/N 10-300, rv +-500 km/s,
random masked chunks and continuum tilts; seed 0), as on the command line:

    payne-lite train-mdn data/default_emulator.h5 -o data/default_mdn.h5 --seed 0

A few minutes on 2 CPU cores. The calibration it prints (fraction of truths within 1
and 3 MDN sigma on 2,000 held-out simulated spectra) should be near 0.68 and 0.997.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.mdn import simulate

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-o", "--out", type=Path, default=HERE / "default_mdn.h5")
    # the emulator beside it: the shipped MDN must match the shipped emulator
    ap.add_argument("--emulator", type=Path, default=HERE / "default_emulator.h5")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    emu = pl.Emulator.load(args.emulator)
    t0 = time.perf_counter()
    mdn = pl.train_mdn(emu, seed=args.seed)
    mdn.meta["training_seconds"] = round(time.perf_counter() - t0, 1)
    mdn.meta["emulator_file"] = args.emulator.name
    print(f"trained {mdn!r} in {mdn.meta['training_seconds']:.0f} s")

    sim = simulate(
        emu, 2000, rng=np.random.default_rng(12345), snr_range=(20.0, 200.0),
        rv_range=mdn.rv_range,
    )  # fmt: skip
    mean, sigma = mdn.predict(sim["flux"], sim["err"], mask=sim["mask"])
    truth = np.column_stack([sim["labels"], sim["rv"]])
    z = np.abs(mean - truth) / sigma
    for j, name in enumerate(mdn.output_names):
        print(
            f"  {name:12s} within 1 sigma {np.mean(z[:, j] < 1):.3f}, "
            f"3 sigma {np.mean(z[:, j] < 3):.3f}"
        )
    mdn.save(args.out)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
