"""Are labels recovered as well from unnormalised spectra, once normalised?

Mock stars from The Payne's real APOGEE network (``pl.datasets.payne_apogee()``:
labels uniform in the middle 60 % of its box, rv 0 but fitted, Gaussian noise at
S/N ``--snr`` per pixel) are fitted four ways, with the same noise draws:

* ``normalised``: the network's flux plus noise, as if normalised perfectly (the
  reference);
* ``continuum-pixels``: the same spectra times a smooth random continuum (per
  APOGEE chip a random quadratic in wavelength whose max / min across the chip is
  drawn uniformly from 1.03 to 2, times a random level from 50 to 500 flux units;
  errors scaled alike), normalised by :meth:`payne_lite.ContinuumPixels.apogee`
  (The Cannon's pixels, per chip, degree 2: what ``payne-lite fit apStar-*.fits``
  does by default);
* ``continuum-pixels-deg3``: the same with a cubic continuum per chip (a shape the
  degree-2 normalisation cannot follow exactly);
* ``sigma-clipped``: the quadratic-continuum spectra normalised by
  :class:`payne_lite.SigmaClipped` (no pixel list; ASPCAP-style upper envelope);
* ``<each of the three>-refined``: the same normalised spectra, then the continuum
  refined against the best-fit model over all pixels and fitted again
  (``pl.fit(..., options=pl.LMOptions(refine_continuum=4, refine_deg=2))``; degree
  3 for the cubic continua): alternating labels and continuum, towards their joint
  fit;
* ``chip-profiled-deg<d>`` (``-cubic``: on the cubic-continuum spectra): no
  normalisation step; the unnormalised flux is fitted with the emulator times a
  Chebyshev polynomial of degree d per APOGEE chip whose coefficients are profiled
  at every LM step (``pl.fit(..., cont_deg=pl.ChipPolynomial.apogee(d),
  options=pl.LMOptions(continuum="profile"))``; issue 20 item 2).

Each is fitted with ``pl.fit`` (LM, the APOGEE mask). The table gives per label the
robust scatter of fit - truth (1.4826 x MAD), its ratio to the reference's, the
median offset, the catastrophic fits (any label more than 5 reference robust
scatters from the truth), those more than 5 reference robust scatters from the
reference's own fit of the same noise draw (what the continuum did, not the noise's
tail) and flagged fits (at a bound, not converged).

    python benchmarks/bench_continuum.py               # 200 stars
    python benchmarks/bench_continuum.py --n 40 --json out.json

Prints a Markdown table; ``--json PATH`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import payne_lite as pl
from payne_lite.observe import APOGEE_CHIPS

NAMES = pl.datasets.PAYNE_LABELS_5
#: Flags counted as failed fits: bit 0 (not converged), 1 (at a bound), 2 (too
#: few pixels).
FAIL_BITS = 0b111


def continuum(wave, rng, deg: int = 2, max_ratio: float = 2.0) -> np.ndarray:
    """(P,) a random smooth continuum: per APOGEE chip a random polynomial of degree
    ``deg`` in wavelength scaled to [0, 1] across the chip, with max / min across
    the chip uniform in [1.03, ``max_ratio``], times a level uniform in [50, 500]."""
    cont = np.ones_like(wave)
    for lo, hi in APOGEE_CHIPS:
        s = (wave >= lo) & (wave < hi)
        t = (wave[s] - lo) / (hi - lo)
        q = np.polynomial.polynomial.polyval(t, rng.uniform(-1, 1, deg + 1))
        q = (q - q.min()) / (q.max() - q.min())
        ratio = rng.uniform(1.03, max_ratio)
        cont[s] = rng.uniform(50, 500) * (1 + (ratio - 1) * q)
    return cont


def mocks(n: int, snr: float, seed: int):
    """Labels (n, 5), normalised noisy flux and errors (n, P), and continua of
    degree 2 and 3 (n, P), from the real network."""
    d = pl.datasets.payne_apogee()
    emu = d.emulator()
    rng = np.random.default_rng(seed)
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, lo.size))
    model = np.asarray(emu.predict(labels), np.float64)
    err = np.full(model.shape, 1.0 / snr)
    flux = model + err * rng.standard_normal(model.shape)
    wave = d.wavelength
    c2 = np.stack([continuum(wave, rng, 2) for _ in range(n)])
    c3 = np.stack([continuum(wave, rng, 3) for _ in range(n)])
    return emu, d, labels, flux, err, c2, c3


def robust(x, axis=0):
    return 1.4826 * np.median(np.abs(x - np.median(x, axis=axis)), axis=axis)


def run(
    n: int = 200,
    snr: float = 50.0,
    seed: int = 0,
    refine_passes: int = 4,
    chip_degs=(2, 3, 4),
) -> dict:
    """The cases' numbers (see the module docstring) as a dict; ``chip_degs``: the
    degrees of the per-chip profiled continuum (those >= 3 also on the cubic
    continua)."""
    emu, d, labels, flux, err, c2, c3 = mocks(n, snr, seed)
    wave = d.wavelength
    cases = {
        "normalised": (flux, err),
        "continuum-pixels": pl.ContinuumPixels.apogee()(wave, flux * c2, err * c2),
        "continuum-pixels-deg3": pl.ContinuumPixels.apogee()(wave, flux * c3, err * c3),
        "sigma-clipped": pl.SigmaClipped(chips=APOGEE_CHIPS)(wave, flux * c2, err * c2),
    }
    for name in ("continuum-pixels", "continuum-pixels-deg3", "sigma-clipped"):
        cases[f"{name}-refined"] = cases[name]
    # no normalisation: the raw flux, the continuum profiled per chip in the fit
    profiled = {}
    for deg in chip_degs:
        profiled[f"chip-profiled-deg{deg}"] = (flux * c2, err * c2, deg)
    for deg in chip_degs:
        if deg >= 3:
            profiled[f"chip-profiled-deg{deg}-cubic"] = (flux * c3, err * c3, deg)
    cases.update(profiled)
    out: dict = {"n": n, "snr": snr, "seed": seed, "labels": list(NAMES), "cases": {}}
    ref_scatter = None
    for name, case in cases.items():
        f, e = case[0], case[1]
        mask = d.mask if name in profiled or len(case) == 2 else (d.mask | case[2])
        t0 = time.perf_counter()
        refine = refine_passes if name.endswith("-refined") else 0
        if name in profiled:
            kw = dict(
                cont_deg=pl.ChipPolynomial.apogee(case[2]),
                options=pl.LMOptions(continuum="profile"),
            )
        else:
            # refined with the normalisation's degree (2), or 3 where the
            # continua are cubic
            deg = 3 if "deg3" in name else 2
            kw = dict(options=pl.LMOptions(refine_continuum=refine, refine_deg=deg))
        t = pl.fit(f, e, emu, mask=mask, **kw)
        seconds = time.perf_counter() - t0
        fitted = np.stack([np.asarray(t[k], np.float64) for k in NAMES], axis=1)
        diff = fitted - labels
        scatter = robust(diff)
        if ref_scatter is None:
            ref_scatter, ref_fit = scatter, fitted
        catastrophic = np.any(np.abs(diff) > 5 * ref_scatter, axis=1)
        # the same, from the reference's fit of the same noise draw: what the
        # continuum did, not the noise
        off_ref = np.any(np.abs(fitted - ref_fit) > 5 * ref_scatter, axis=1)
        flags = np.asarray(t["flags"])
        out["cases"][name] = {
            "robust_scatter": scatter.tolist(),
            "ratio_to_normalised": (scatter / ref_scatter).tolist(),
            "median_offset": np.median(diff, axis=0).tolist(),
            "n_catastrophic": int(catastrophic.sum()),
            "n_off_reference": int(off_ref.sum()),
            "n_failed_flags": int(np.count_nonzero(flags & FAIL_BITS)),
            "fit_seconds": round(seconds, 2),
        }
    return out


def markdown(res: dict) -> str:
    head = (
        "| case | "
        + " | ".join(res["labels"])
        + " | catastrophic | off the reference | flagged |"
    )
    lines = [
        f"{res['n']} mock stars, S/N {res['snr']:g}, seed {res['seed']}: robust "
        "scatter of fit - truth (ratio to the normalised mocks; median offset)",
        "",
        head,
        "|" + "---|" * (len(res["labels"]) + 4),
    ]
    for name, c in res["cases"].items():
        cells = [
            f"{s:.3g} ({r:.2f}x; {m:+.2g})"
            for s, r, m in zip(
                c["robust_scatter"],
                c["ratio_to_normalised"],
                c["median_offset"],
                strict=True,
            )
        ]
        lines.append(
            f"| {name} | "
            + " | ".join(cells)
            + f" | {c['n_catastrophic']} | {c['n_off_reference']} "
            + f"| {c['n_failed_flags']} |"
        )
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="mock stars (default 200)")
    ap.add_argument("--snr", type=float, default=50.0, help="S/N per pixel (50)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH", help="write JSON here")
    ap.add_argument(
        "--chip-degs",
        type=int,
        nargs="+",
        default=[2, 3, 4],
        metavar="D",
        help="degrees of the per-chip profiled continuum (default 2 3 4)",
    )
    ap.add_argument(
        "--refine-passes",
        type=int,
        default=4,
        metavar="N",
        help="passes of LMOptions.refine_continuum in the -refined cases (4)",
    )
    args = ap.parse_args(argv)
    res = run(
        args.n,
        args.snr,
        args.seed,
        refine_passes=args.refine_passes,
        chip_degs=tuple(args.chip_degs),
    )
    print(markdown(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    main()
