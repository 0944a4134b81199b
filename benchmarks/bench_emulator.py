"""Emulator benchmarks: accuracy against a real network, training time, throughput.

    python benchmarks/bench_emulator.py throughput      # ~1 min
    python benchmarks/bench_emulator.py teacher         # ~5 min (LM); --adam adds Adam
    python benchmarks/bench_emulator.py default-grid    # the shipped default emulator
    python benchmarks/bench_emulator.py all --json out.json

``throughput``: the real 7214-pixel Payne network (``pl.datasets.payne_apogee()``) for
10,000 label vectors, our batched jitted evaluation against the original's way (NumPy
einsum, one spectrum per call, exactly The Payne's code: x_min in float64), all timed
in interleaved rounds of this run, after warm-up, best of 5. Rows: jitted calls of 512
spectra whose outputs are released as they come (the evaluation itself; the allocator
reuses the output buffers), calls of 512 whose 20 outputs are all kept as JAX arrays
(each a fresh 15 MB buffer, written while the kernel computes), one jitted call of all
10,000 (a fresh 288 MB output), and the public ``Emulator.predict``, which delivers
one (10000, 7214) NumPy array (validation, and a copy of each chunk of 256 into it;
the array reuses the memory of the previous call's freed result, see
``payne_lite/emulator/_outpool.py``, as consecutive predict calls in a user's loop
do; a first call pays the page faults of a fresh array, the ``fresh_array`` row), and
the same into one caller-owned array reused across calls (``out=``). The public rows
also print their ratio to the calls of 512 of the same run. Timed in the same
rounds: the 1-spectrum latency of ``Emulator.predict`` (best of 30 calls per round)
against the original's time per spectrum, and a fresh (10000, 7214) float32 array
written once (np.empty + fill: the operating system's share of a fresh result). On
the project's 2-core VM that share is bimodal: pages freed more than a few seconds
earlier have been returned to the host (virtio balloon, free page reporting), and
faulting 288 MB of them in again takes 1.3-2.4 s instead of 40 ms. The fresh array is
timed right before the public rows, so that it, not the first public row of each
round, meets the pages the host took back; the public rows then find recently freed
pages, as consecutive predict calls in a user's loop do.
``Emulator.predict`` evaluates float32 tanh with ``tanh_rational`` by default
(``fast_tanh=True``; the row marked fast_tanh=False evaluates ``jnp.tanh``, as the
rows of jitted calls do unless marked fast_tanh=True). The bound is the activations:
36,070 tanh per spectrum. The rates of ``jnp.tanh`` (the issue's bound, default XLA
options), and of ``jnp.tanh`` and
``tanh_rational`` compiled like the kernel (512-bit vectors), are measured in the same
rounds on a cache-resident array; each row prints its fraction of the issue's bound
and of the bound of the activation it evaluates.

``teacher``: 2,000 label vectors uniform in the middle 90 % of the real network's box,
spectra made by that network, a fresh per-pixel emulator of the same size (5 hidden,
sigmoid) trained on 1,600 (its own early-stopping split inside those) and tested on the
other 400: the median over pixels of the per-pixel median |error| and the 99th
percentile pixel. Targets: < 5e-4 and < 3e-3, in under 10 minutes on 2 cores.

``default-grid``: the shipped ``data/default_emulator.h5`` on 400 fresh spectra from
the built-in synthesizer (a seed it was not trained on). Target: median |error| < 1e-3.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import payne_lite as pl
from payne_lite.emulator import (
    KERNEL_COMPILER_OPTIONS,
    predict_batch,
    predict_kernel,
    tanh_rational,
)

ROOT = Path(__file__).resolve().parents[1]


def payne_data() -> pl.datasets.PayneApogee:
    """The real Payne/APOGEE example data shipped with payne_lite (exits if absent)."""
    try:
        return pl.datasets.payne_apogee()
    except FileNotFoundError as err:
        sys.exit(f"skipped: real Payne network needed: {err}")


def load_teacher() -> pl.Emulator:
    return payne_data().emulator()


def _activation_loop(act, n=1 << 20, total=4e8, compiler_options=None):
    """(fn, count): ``fn()`` evaluates ``act`` ``count`` times on a cache-resident array."""
    reps = int(total // n)
    x = jnp.asarray(np.random.default_rng(0).normal(size=n).astype(np.float32))
    f = jax.jit(
        lambda x: jax.lax.fori_loop(0, reps, lambda i, y: act(y) * 1.5 + 0.1, x),
        compiler_options=compiler_options,
    )
    return (lambda: f(x).block_until_ready()), reps * n


def numpy_original(emu: pl.Emulator | None = None):
    """The Payne's ``get_spectrum_from_neural_net`` in NumPy, one spectrum per call.

    ``emu=None``: exactly The Payne's code on the real network's npz arrays (x_min in
    float64). Otherwise the same formula on ``emu``'s arrays (one hidden sigmoid layer,
    as the classic Payne network and the shipped default emulator have).
    """
    if emu is None:
        raw = np.load(payne_data().network)
        w0, b0, w1, b1 = (
            raw[k] for k in ("w_array_0", "b_array_0", "w_array_1", "b_array_1")
        )
        x_min, x_max = raw["x_min"], raw["x_max"]
    else:
        if len(emu.hidden) != 1 or emu.activation != "sigmoid":
            raise ValueError(
                f"the NumPy original needs one hidden sigmoid layer, got {emu!r}"
            )
        (w0, w1), (b0, b1) = (
            [np.asarray(a) for a in emu.net.weights],
            [np.asarray(a) for a in emu.net.biases],
        )
        x_min, x_max = np.asarray(emu.label_lo), np.asarray(emu.label_hi)

    def original(labels):  # The Payne's get_spectrum_from_neural_net, per spectrum
        s = (labels - x_min) / (x_max - x_min) - 0.5
        inside = np.einsum("ijk,k->ij", w0, s) + b0
        outside = 1.0 / (1.0 + np.exp(-inside))
        return np.einsum("ij,ij->i", w1, outside) + b1

    return original


#: Rows of :func:`bench_throughput` (the key of each timed variant).
THROUGHPUT_ROWS = (
    "released_512",
    "released_512_fast",
    "kept_512",
    "one_call",
    "public",
    "public_exact",
    "public_out",
    "public_1",
    "fresh_array",
)


def bench_throughput(
    n_spec: int = 10_000,
    rounds: int = 5,
    *,
    emu: pl.Emulator | None = None,
    rows: tuple[str, ...] = THROUGHPUT_ROWS,
) -> dict:
    """Spectra/s of the rows in ``rows`` and of the NumPy original, timed in one run.

    ``emu=None``: the real Payne network (the issue's benchmark); otherwise any
    emulator with one hidden sigmoid layer against the same NumPy formula on its
    arrays. ``rows`` picks a subset of :data:`THROUGHPUT_ROWS` (the suite's quick mode
    times ``released_512`` and ``public`` only).
    """
    unknown = set(rows) - set(THROUGHPUT_ROWS)
    if unknown:
        raise ValueError(f"unknown rows {sorted(unknown)}; expected {THROUGHPUT_ROWS}")
    original = numpy_original(emu)
    if emu is None:
        emu = load_teacher()

    rng = np.random.default_rng(0)
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.05, 0.95, (n_spec, emu.n_labels))

    net = emu.params(jnp.float32)
    s = jnp.asarray(emu.scale(labels), dtype=jnp.float32)
    k, k_act = emu.kernel_params(jnp.float32)

    def chunks(size):
        pad = -n_spec % size
        s_pad = jnp.concatenate([s, jnp.zeros((pad, s.shape[1]), s.dtype)])
        return [s_pad[i : i + size] for i in range(0, n_spec + pad, size)]

    def released(size, fast_tanh=False):  # each output freed before the next is written
        cs = chunks(size)

        def run():
            for c in cs:
                res = predict_kernel(k, c, k_act, fast_tanh=fast_tanh)
            res.block_until_ready()

        return run

    def kept(size):  # every chunk's output kept, as a list of JAX arrays
        cs = chunks(size)
        return lambda: jax.block_until_ready([predict_kernel(k, c, k_act) for c in cs])

    n_act = emu.n_pix * emu.hidden[0]
    act_loops = {  # "_k": compiled like the kernel (KERNEL_COMPILER_OPTIONS, 512-bit)
        "tanh": _activation_loop(jnp.tanh),
        "tanh_k": _activation_loop(jnp.tanh, compiler_options=KERNEL_COMPILER_OPTIONS),
        "tanh_rational_k": _activation_loop(
            tanh_rational, compiler_options=KERNEL_COMPILER_OPTIONS
        ),
        "sigmoid": _activation_loop(jax.nn.sigmoid),
    }
    n_base = 300
    reused = np.empty((n_spec, emu.n_pix), np.float32) if "public_out" in rows else None
    n_one = 30  # 1-spectrum predicts per timing of "public_1"

    def one_spectrum():
        for _ in range(n_one):
            emu.predict(labels[0])

    runs = {
        "baseline": lambda: [original(x) for x in labels[:n_base]],
        "released_512": released(512),
        "released_512_fast": released(512, fast_tanh=True),
        "kept_512": kept(512),
        "one_call": lambda: predict_batch(net, s, emu.activation).block_until_ready(),
        # what the operating system charges for a fresh result: a new (n, P) float32
        # array written once (np.empty + fill), no computation; timed right before
        # the public rows (see the module docstring)
        "fresh_array": lambda: np.empty((n_spec, emu.n_pix), np.float32).fill(1.0),
        "public": lambda: emu.predict(labels),
        "public_exact": lambda: emu.predict(labels, fast_tanh=False),
        "public_out": lambda: emu.predict(labels, out=reused),
        "public_1": one_spectrum,
        **{f"act_{name}": fn for name, (fn, _) in act_loops.items()},
    }
    runs = {k: f for k, f in runs.items() if k not in THROUGHPUT_ROWS or k in rows}
    for name, fn in runs.items():  # compile every shape first
        if name != "baseline":
            fn()
    # Interleaved rounds, best of each: the machine is shared and its speed drifts, so
    # the baseline and our code are timed in the same moments.
    best = dict.fromkeys(runs, np.inf)
    for _ in range(rounds):
        for name, fn in runs.items():
            t = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t)
    base_rate = n_base / best.pop("baseline")
    one = best.pop("public_1", np.nan) / n_one  # seconds per 1-spectrum predict
    fresh = best.pop("fresh_array", np.nan)  # seconds for a fresh (n, P) array
    out = emu.predict(labels[:64])
    err = np.max(np.abs(out - np.stack([original(x) for x in labels[:64]])))

    tanh_rate, tanh_k_rate, rational_rate, sig_rate = (
        count / best.pop(f"act_{name}") for name, (_, count) in act_loops.items()
    )
    bound = tanh_rate / n_act
    rates = {name: n_spec / t for name, t in best.items()}
    res = dict(
        n_spec=n_spec,
        baseline_spectra_per_s=base_rate,
        **{f"{k}_spectra_per_s": v for k, v in rates.items()},
        **{f"{k}_speedup": v / base_rate for k, v in rates.items()},
        **{f"{k}_fraction_of_bound": v / bound for k, v in rates.items()},
        activations_per_spectrum=n_act,
        tanh_per_s=tanh_rate,
        tanh_512bit_per_s=tanh_k_rate,
        tanh_rational_512bit_per_s=rational_rate,
        sigmoid_per_s=sig_rate,
        activation_bound_spectra_per_s=bound,
        public_1_latency_s=one,
        fresh_array_s=fresh,
        baseline_latency_s=1.0 / base_rate,
        rational_bound_spectra_per_s=rational_rate / n_act,
        max_abs_err_vs_original=float(err),
    )
    print(
        f"throughput ({n_spec} spectra, {emu.n_pix} px, float32, best of {rounds} "
        "interleaved rounds; x = ratio to the original, % = of the jnp.tanh bound, "
        "own = of the bound of the activation the row evaluates):"
    )
    print(f"  {'original (NumPy, 1 spectrum/call)':<52}: {base_rate:9,.0f} spectra/s")
    own = {False: tanh_k_rate / n_act, True: rational_rate / n_act}
    table = [
        ("jitted calls of 512, each output released", "released_512", False),
        ("  the same, fast_tanh=True (tanh_rational)", "released_512_fast", True),
        ("jitted calls of 512, all outputs kept (JAX)", "kept_512", False),
        ("one jitted call of all spectra", "one_call", False),
        (f"Emulator.predict -> one (n, {emu.n_pix}) NumPy array", "public", True),
        ("  the same, fast_tanh=False (jnp.tanh)", "public_exact", False),
        ("  the same (default) into one reused array (out=)", "public_out", True),
    ]
    for text, key, fast in table:
        if key not in rates:
            continue
        print(
            f"  {text:<52}: {rates[key]:9,.0f} spectra/s  "
            f"x{rates[key] / base_rate:5.1f}  {rates[key] / bound:4.0%}  "
            f"own {rates[key] / own[fast]:4.0%}"
        )
    print(
        f"  activation bound: {n_act} tanh per spectrum; jnp.tanh on a flat array "
        f"runs at {tanh_rate:.2e}/s -> {bound:,.0f} spectra/s (the issue's bound); "
        f"compiled like the kernel (512-bit vectors) jnp.tanh runs at "
        f"{tanh_k_rate:.2e}/s -> {own[False]:,.0f}/s, tanh_rational at "
        f"{rational_rate:.2e}/s -> {own[True]:,.0f}/s (sigmoid {sig_rate:.2e}/s)."
    )
    if "public" in rates:
        rel = rates.get("released_512", np.nan)
        print(
            f"  public Emulator.predict of {n_spec}: x{rates['public'] / base_rate:.1f} "
            f"The Payne's NumPy code, {rates['public'] / bound:.0%} of the activation "
            f"bound, {rates['public'] / rel:.0%} of the calls of 512 (same run)"
        )
    if np.isfinite(fresh):
        print(
            f"  a fresh ({n_spec}, {emu.n_pix}) float32 array written once (np.empty + "
            f"fill, no computation): {fresh * 1e3:.0f} ms, against "
            f"{n_spec / rates.get('released_512', np.nan) * 1e3:.0f} ms for the calls "
            "of 512"
        )
    if np.isfinite(one):
        print(
            f"  1-spectrum Emulator.predict: {one * 1e3:.2f} ms "
            f"(the original: {1e3 / base_rate:.2f} ms per spectrum)"
        )
    print(f"  max |ours - original| on 64 spectra: {err:.1e}")
    return res


def _teacher_data(emu, n=2000, seed=1):
    rng = np.random.default_rng(seed)
    lo, hi = emu.bounds
    labels = lo + (hi - lo) * rng.uniform(0.05, 0.95, (n, emu.n_labels))
    return labels, emu.predict(labels)


def _errors(emu, labels, flux):
    mae = np.median(np.abs(emu.predict(labels, allow_outside=True) - flux), axis=0)
    return float(np.median(mae)), float(np.percentile(mae, 99))


def bench_teacher(
    adam: bool = False,
    max_iter: int = 150,
    *,
    teacher: pl.Emulator | None = None,
    n_train: int = 1600,
    n_test: int = 400,
    progress: bool = True,
) -> dict:
    """Train a fresh emulator of the teacher's size on its spectra; held-out errors.

    ``teacher=None``: the real Payne network (the issue's task: 1,600 + 400 spectra).
    The suite's quick mode passes fewer spectra and iterations.
    """
    if teacher is None:
        teacher = load_teacher()
    labels, flux = _teacher_data(teacher, n=n_train + n_test)
    grid = pl.SpectralGrid(
        wavelength=teacher.wavelength,
        labels=labels[:n_train],
        flux=flux[:n_train],
        label_names=teacher.label_names,
        label_units=teacher.label_units,
    )
    res = {}
    runs = [("lm", dict(max_iter=max_iter))]
    if adam:
        runs.append(
            (
                "adam",
                dict(
                    optimizer="adam",
                    learning_rate=1e-2,
                    batch_size=256,
                    max_iter=400,
                    patience=400,
                ),
            )
        )
    for name, kw in runs:
        t = time.perf_counter()
        emu = pl.train_emulator(
            grid, hidden=teacher.hidden[0], seed=0, progress=progress, **kw
        )
        dt = time.perf_counter() - t
        med, p99 = _errors(emu, labels[n_train:], flux[n_train:])
        res[name] = dict(
            train_seconds=dt,
            median_abs_error=med,
            p99_pixel_error=p99,
            iterations=len(emu.history["seconds"]),
            restarted_pixels=emu.meta["n_restarted_pixels"],
        )
        print(
            f"teacher task, {name}: held-out median |err| {med:.2e} (target < 5e-4), "
            f"99th pct pixel {p99:.2e} (< 3e-3), {dt:.0f} s (< 600 s), "
            f"{res[name]['iterations']} iterations"
        )
    return res


def bench_default_grid() -> dict:
    from payne_lite.grid import synth

    path = ROOT / "data" / "default_emulator.h5"
    emu = pl.Emulator.load(path)
    labels = synth.sample_labels(400, seed=12345, method="uniform")
    flux = synth.synthesize(labels, wavelength=emu.wavelength)
    med, p99 = _errors(emu, labels, flux)
    print(
        f"default emulator {path.name}: held-out median |err| {med:.2e} "
        f"(target < 1e-3), 99th pct pixel {p99:.2e}"
    )
    return dict(median_abs_error=med, p99_pixel_error=p99)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("which", choices=["throughput", "teacher", "default-grid", "all"])
    ap.add_argument(
        "--adam", action="store_true", help="also train with Adam (teacher)"
    )
    ap.add_argument("--max-iter", type=int, default=150, help="LM iterations (teacher)")
    ap.add_argument("--json", type=Path, help="write the numbers here")
    args = ap.parse_args(argv)
    res = {"jax": jax.__version__, "devices": [str(d) for d in jax.devices()]}
    if args.which in ("throughput", "all"):
        res["throughput"] = bench_throughput()
    if args.which in ("teacher", "all"):
        res["teacher"] = bench_teacher(adam=args.adam, max_iter=args.max_iter)
    if args.which in ("default-grid", "all"):
        res["default_grid"] = bench_default_grid()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=2, default=float))


if __name__ == "__main__":
    main()
