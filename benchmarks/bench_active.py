"""Active learning of grid points against a Latin hypercube (issue 19 part 2).

On the built-in synthesizer (``--n-pix`` pixels of the default wavelength grid), for each
seed: a Latin-hypercube grid of ``--n-lhs`` spectra is trained from scratch
(``train_emulator``, ``--max-iter`` LM iterations, 20 % held out) and its median
|error| on one fixed held-out test grid (``--n-test`` uniform draws, the same for every
seed and method) is the target. Then ``active_learning`` grows a ``--n-start``
Latin-hypercube grid by ``--batch`` spectra per round up to ``--n-total``, once per
strategy (``error``: the default, the regressed error map tempered to a density ~
error**0.5; ``error:X``: exponent X; ``space``: boundary-corrected maximin; ``random``:
uniform draws, the control), warm-starting every round. The Latin hypercube is trained
with each budget of ``--lhs-max-iter`` (the default 150 iterations, and 630: as many as
the active runs may spend over all their rounds, so that warm-started extra iterations
are not mistaken for better labels). Reported: the spectra each strategy needs to reach each target
(first round at or below it; mean over seeds, inf when never), the final errors, and
the learning curves as a PNG.

    python benchmarks/bench_active.py                          # 3 seeds, ~35 min on 2 busy cores
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
from payne_lite.emulator import ErrorMap, active_learning
from payne_lite.grid import synth

KEYS = ("test_median_abs_error", "test_p90_spectrum_error")


def strategy_of(name: str):
    """``"error:0.5"``: the error map with exponent 0.5; other names as they are."""
    if name.startswith("error:"):
        return ErrorMap(exponent=float(name.split(":", 1)[1]))
    return name


def held_out(emu, test) -> tuple[float, float]:
    err = np.abs(np.asarray(emu.predict(test.labels)) - test.flux)
    return float(np.median(err)), float(np.percentile(err.mean(axis=1), 90))


def needed(curve: dict, target: float) -> float:
    """Spectra at the first round whose test median |error| is <= target (inf: never)."""
    ok = np.nonzero(curve["test_median_abs_error"] <= target)[0]
    return float(curve["n_spec"][ok[0]]) if ok.size else np.inf


def run_seed(seed, wave, test, args) -> dict:
    lhs = synth.make_grid(args.n_lhs, wavelength=wave, seed=1000 + seed, progress=False)
    out = {"seed": seed, "lhs": {}}
    for budget in args.lhs_max_iter:
        t0 = time.perf_counter()
        emu = pl.train_emulator(
            lhs, hidden=args.hidden, max_iter=budget, seed=seed, progress=False
        )
        med, p90 = held_out(emu, test)
        out["lhs"][budget] = {
            "n_spec": args.n_lhs,
            "n_iter": len(emu.history["valid_rms"]),
            "test_median_abs_error": med,
            "test_p90_spectrum_error": p90,
            "seconds": time.perf_counter() - t0,
        }
        print(f"seed {seed} LHS-{args.n_lhs}, max_iter {budget}: median {med:.3e}, "
              f"p90 {p90:.3e}; {out['lhs'][budget]['seconds']:.0f} s", flush=True)  # fmt: skip
    start = synth.make_grid(args.n_start, wavelength=wave, seed=seed, progress=False)
    for strategy in args.strategies:
        t0 = time.perf_counter()
        run = active_learning(
            start,
            lambda x: synth.synthesize(x, wavelength=wave),
            n_total=args.n_total,
            batch_size=args.batch,
            strategy=strategy_of(strategy),
            test=test,
            seed=seed,
            hidden=args.hidden,
            max_iter=args.max_iter,
            refine_iter=args.refine_iter,
        )
        need = {
            b: needed(run.curve, out["lhs"][b]["test_median_abs_error"])
            for b in args.lhs_max_iter
        }
        out[strategy] = {
            "curve": {k: v.tolist() for k, v in run.curve.items()},
            "needed": need,
            "seconds": time.perf_counter() - t0,
        }
        print(f"seed {seed} {strategy}: spectra needed per LHS budget {need}; "
              f"{out[strategy]['seconds']:.0f} s", flush=True)  # fmt: skip
    return out


def _flag(key: str, value: str) -> list[str]:
    """Command-line words of a saved argument (``str`` of an int or a list of them)."""
    words = value.strip("[]").replace(",", " ").replace("'", "").split()
    return [f"--{key.replace('_', '-')}", *words]


def figure(results, args, path: Path) -> None:
    """Per strategy the mean curve over seeds (thick) and each seed's (thin); per LHS
    budget its mean over seeds as a horizontal line and a marker with the seeds' range
    at its size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    colours = {"error": "C3", "space": "C2", "random": "C0"}
    for ax, key in zip(axes, KEYS, strict=True):
        for b, (ls, mk) in zip(
            args.lhs_max_iter, [("--", "s"), (":", "D")], strict=False
        ):
            v = np.array([r["lhs"][b][key] for r in results])
            ax.axhline(v.mean(), color="0.3", lw=1, ls=ls)
            ax.errorbar([args.n_lhs], [v.mean()], yerr=[[v.mean() - v.min()],
                        [v.max() - v.mean()]], fmt=mk, color="0.3", ms=5, capsize=3,
                        label=f"LHS {args.n_lhs}, {b} LM it.")  # fmt: skip
        for s in args.strategies:
            n = np.asarray(results[0][s]["curve"]["n_spec"])
            ys = np.array([r[s]["curve"][key] for r in results])
            for y in ys:
                ax.plot(n, y, "-", color=colours.get(s), lw=0.7, alpha=0.35)
            ax.plot(n, ys.mean(0), "o-", color=colours.get(s), ms=4, lw=2,
                    label=f"active: {s}")  # fmt: skip
    for ax, title in zip(
        axes,
        ("median |error| over test spectra and pixels",
         "90th pct over test spectra of mean |error|"),
        strict=True,
    ):  # fmt: skip
        ax.set_xlabel("spectra synthesized (active: start + batches)")
        ax.set_ylabel("flux error")
        ax.set_title(title, fontsize=10)
        ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Built-in synthesizer, {args.n_pix} pixels, one test grid of {args.n_test}: "
        f"mean of seeds {', '.join(map(str, args.seeds))} (thin: each seed)",
        fontsize=10,
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
    p.add_argument("--max-iter", type=int, default=150, help="active: first round")
    p.add_argument("--refine-iter", type=int, default=60, help="active: later rounds")
    p.add_argument(
        "--lhs-max-iter", type=int, nargs="+", default=[150, 630],
        help="LHS training budgets (150: the default; 630 = 150 + 8 x 60, what the "
        "active runs may spend in all with the defaults)",
    )  # fmt: skip
    p.add_argument("--strategies", nargs="+", default=["error", "space", "random"])
    p.add_argument("--json", type=Path)
    p.add_argument("--replot", type=Path, help="redraw the figure from a --json file")
    p.add_argument(
        "--figure", type=Path, default=Path("benchmarks/results/active_learning.png")
    )
    args = p.parse_args(argv)
    if args.replot:
        saved = json.loads(args.replot.read_text())
        old = p.parse_args([a for k, v in saved["args"].items() if k not in
                            ("json", "replot", "figure") for a in _flag(k, v)])  # fmt: skip
        results = saved["results"]
        for r in results:
            r["lhs"] = {int(b): v for b, v in r["lhs"].items()}
        figure(results, old, args.figure)
        return saved
    wave = synth.default_wavelength()[2000 : 2000 + args.n_pix]
    test = synth.make_grid(
        args.n_test, wavelength=wave, seed=99_999, sampling="uniform", progress=False
    )
    results = [run_seed(s, wave, test, args) for s in args.seeds]
    summary = {}
    for b in args.lhs_max_iter:
        lhs = [r["lhs"][b]["test_median_abs_error"] for r in results]
        print(f"\nTarget: LHS-{args.n_lhs} trained {b} iterations, median |error| "
              f"{', '.join(f'{v:.3e}' for v in lhs)} (seeds {args.seeds})")  # fmt: skip
        print("\n| strategy | spectra needed, per seed | mean |\n|---|---|---|")
        for s in args.strategies:
            n = [r[s]["needed"][b] for r in results]
            summary[f"{s}@{b}"] = float(np.mean(n))
            print(f"| {s} | {', '.join(f'{v:.0f}' for v in n)} | {np.mean(n):.0f} |")
    print(
        f"\nAt {args.n_total} spectra (median, p90 per seed) against LHS-{args.n_lhs}"
    )
    print(
        "\n| method | median abs. error | p90 of spectra's mean abs. error |\n|---|---|---|"
    )
    for b in args.lhs_max_iter:
        cells = [[r["lhs"][b][k] for r in results] for k in KEYS]
        print(f"| LHS-{args.n_lhs}, {b} it. | "
              + " | ".join(", ".join(f"{v:.3e}" for v in c) for c in cells) + " |")  # fmt: skip
    for s in args.strategies:
        cells = [[r[s]["curve"][k][-1] for r in results] for k in KEYS]
        print(f"| {s} at {args.n_total} | "
              + " | ".join(", ".join(f"{v:.3e}" for v in c) for c in cells) + " |")  # fmt: skip
    figure(results, args, args.figure)
    print(f"\nfigure: {args.figure}")
    out = {"args": {k: str(v) for k, v in vars(args).items()}, "results": results,
           "mean_needed": summary}  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
