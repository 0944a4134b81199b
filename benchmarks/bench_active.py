"""Active learning of grid points against a Latin hypercube (issue 19 part 2).

On the built-in synthesizer (``--n-pix`` pixels of the default wavelength grid), for each
seed: a Latin-hypercube grid of ``--n-lhs`` spectra is trained from scratch
(``train_emulator``, ``--max-iter`` LM iterations, 20 % held out) and its median
|error| on one fixed held-out test grid (``--n-test`` uniform draws, the same for every
seed and method) is the target. Then ``active_learning`` grows a ``--n-start``
Latin-hypercube grid by ``--batch`` spectra per round up to ``--n-total``, once per
strategy (``error``: the regressed error map; ``random``: uniform draws, the control),
warm-starting every round. Reported: the spectra each strategy needs to reach the
target (first round at or below it; mean over seeds), the final errors, and the
learning curves as a PNG.

    python benchmarks/bench_active.py                          # 3 seeds, ~10 min
    python benchmarks/bench_active.py --seeds 0 --n-total 1000 --n-pix 60   # quick

Prints a Markdown table; ``--json PATH`` writes the numbers, ``--figure PATH`` the
figure (default ``benchmarks/results/active_learning.png``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.emulator import active_learning
from payne_lite.grid import synth

KEYS = ("test_median_abs_error", "test_p90_spectrum_error")


def held_out(emu, test) -> tuple[float, float]:
    err = np.abs(np.asarray(emu.predict(test.labels)) - test.flux)
    return float(np.median(err)), float(np.percentile(err.mean(axis=1), 90))


def needed(curve: dict, target: float) -> float:
    """Spectra at the first round whose test median |error| is <= target (inf: never)."""
    ok = np.nonzero(curve["test_median_abs_error"] <= target)[0]
    return float(curve["n_spec"][ok[0]]) if ok.size else np.inf


def run_seed(seed, wave, test, args) -> dict:
    t0 = time.perf_counter()
    lhs = synth.make_grid(args.n_lhs, wavelength=wave, seed=1000 + seed, progress=False)
    emu = pl.train_emulator(
        lhs, hidden=args.hidden, max_iter=args.max_iter, seed=seed, progress=False
    )
    target, target_p90 = held_out(emu, test)
    out = {
        "seed": seed,
        "lhs": {
            "n_spec": args.n_lhs,
            "test_median_abs_error": target,
            "test_p90_spectrum_error": target_p90,
            "seconds": time.perf_counter() - t0,
        },
    }
    start = synth.make_grid(args.n_start, wavelength=wave, seed=seed, progress=False)
    for strategy in args.strategies:
        t0 = time.perf_counter()
        run = active_learning(
            start,
            lambda x: synth.synthesize(x, wavelength=wave),
            n_total=args.n_total,
            batch_size=args.batch,
            strategy=strategy,
            test=test,
            seed=seed,
            hidden=args.hidden,
            max_iter=args.max_iter,
            refine_iter=args.refine_iter,
        )
        out[strategy] = {
            "curve": {k: v.tolist() for k, v in run.curve.items()},
            "needed": needed(run.curve, target),
            "seconds": time.perf_counter() - t0,
        }
        print(
            f"seed {seed} {strategy}: needs {out[strategy]['needed']:.0f} spectra "
            f"(target {target:.3e}); {out[strategy]['seconds']:.0f} s",
            flush=True,
        )
    return out


def figure(results, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    colours = {"error": "C3", "space": "C2", "random": "C0"}
    for r in results:
        for ax, key in zip(axes, KEYS, strict=True):
            lhs = r["lhs"][key]
            ax.axhline(lhs, color="0.5", lw=0.8, ls="--")
            ax.plot([args.n_lhs], [lhs], "ks", ms=5)
            for s in args.strategies:
                c = r[s]["curve"]
                label = s if r is results[0] else None
                ax.plot(c["n_spec"], c[key], "o-", color=colours.get(s), ms=3,
                        lw=1, label=label)  # fmt: skip
    axes[0].plot([], [], "ks--", label=f"LHS {args.n_lhs} (target)")
    for ax, title in zip(
        axes,
        ("median |error| (test grid)", "90th pct over spectra of mean |error|"),
        strict=True,
    ):
        ax.set_xlabel("spectra synthesized")
        ax.set_ylabel("flux error")
        ax.set_title(title)
        ax.set_yscale("log")
    axes[0].legend()
    fig.suptitle(
        f"Active learning, built-in synthesizer, {args.n_pix} pixels, "
        f"seeds {args.seeds}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--n-pix", type=int, default=200)
    p.add_argument("--n-lhs", type=int, default=2000)
    p.add_argument("--n-start", type=int, default=400)
    p.add_argument("--n-total", type=int, default=2000)
    p.add_argument("--batch", type=int, default=200)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--hidden", type=int, default=10)
    p.add_argument("--max-iter", type=int, default=150)
    p.add_argument("--refine-iter", type=int, default=60)
    p.add_argument("--strategies", nargs="+", default=["error", "space", "random"])
    p.add_argument("--json", type=Path)
    p.add_argument(
        "--figure", type=Path, default=Path("benchmarks/results/active_learning.png")
    )
    args = p.parse_args(argv)
    wave = synth.default_wavelength()[2000 : 2000 + args.n_pix]
    test = synth.make_grid(
        args.n_test, wavelength=wave, seed=99_999, sampling="uniform", progress=False
    )
    results = [run_seed(s, wave, test, args) for s in args.seeds]
    print(f"\n| method | spectra to reach LHS-{args.n_lhs} median (per seed) | mean |")
    print("|---|---|---|")
    summary = {}
    for s in args.strategies:
        n = [r[s]["needed"] for r in results]
        summary[s] = float(np.mean(n))
        print(f"| {s} | {', '.join(f'{v:.0f}' for v in n)} | {np.mean(n):.0f} |")
    print(
        f"\n| seed | LHS-{args.n_lhs} median | "
        + " | ".join(f"{s} at {args.n_total} median, p90" for s in args.strategies)
        + f" | LHS p90 |\n|---|---|{'---|' * len(args.strategies)}---|"
    )
    for r in results:
        cells = [
            f"{r[s]['curve']['test_median_abs_error'][-1]:.3e}, "
            f"{r[s]['curve']['test_p90_spectrum_error'][-1]:.3e}"
            for s in args.strategies
        ]
        print(
            f"| {r['seed']} | {r['lhs']['test_median_abs_error']:.3e} | "
            + " | ".join(cells)
            + f" | {r['lhs']['test_p90_spectrum_error']:.3e} |"
        )
    figure(results, args, args.figure)
    print(f"\nfigure: {args.figure}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
           "mean_needed": summary}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
