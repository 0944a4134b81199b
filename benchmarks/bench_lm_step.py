"""One LM step of the fitter against its bound, and where a fit's time goes.

    python benchmarks/bench_lm_step.py              # ~2 min
    python benchmarks/bench_lm_step.py --n-fit 256 --rounds 3

Issue 15 item 4: "state the bound for one LM step (the forward pass with its label
and rv derivatives over all pixels: activations and FLOPs per star) and how far each
step is from it". On the real APOGEE network (``pl.datasets.payne_apogee()``, 5
labels, 5 hidden units, 7,214 pixels; Lanczos-6 Doppler shift), float32, one core:

* **The step's normal equations** (:func:`payne_lite.observe.normal_equations`: the
  model, its rv and label derivatives, ``J^T W J``, ``J^T W r`` and chi2 of one star)
  over 128 stars through ``lax.map``, compiled as the LM compiles them (``serial_jit``),
  and its stages cumulatively: the activations and their derivatives; + the
  (R, S) rows of the flux and its derivatives; + the Doppler shift's taps (the
  weighted rows ``x``); + the products (the whole evaluation).
* **The bound**: each stage's arithmetic (tanh and multiply-adds per star, counted
  from the shapes) at the rates XLA reaches on this machine for the same kinds of
  loops on cache-resident arrays (``jnp.tanh``, and a fused loop of 16 multiply-adds
  per element, both compiled like the kernel), best of the rounds. This is the bound of
  code XLA writes, not the CPU's peak.
* **Memory**: the same rows computed with random weights for 1,000 and for 8,238 rest
  pixels (the network's weights, 2.4 MB in the jet's layout, then fit the 2 MB L2
  cache or not): time per pixel of each.
* **The LM's own cost per evaluation**: ``lm_batch`` from starts 0.05 (scaled labels)
  and 1 km/s from the truth, less its evaluations times the normal equations' time:
  the loop, the damped solves, the acceptance test.
* **A fit's stages** (``pl.fit`` of ``--n-fit`` mocks at S/N 50, one thread, the
  driver's calls timed as they return): RV scan, screening of the starts, LM, rv
  polish, the rest (host work: inputs, tables, S/N).

All rows are timed in interleaved rounds of one run (best of ``--rounds``); the
machine is shared, so read the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import payne_lite as pl  # noqa: E402
from benchmarks import bench_fit as bf  # noqa: E402
from payne_lite._serial import serial_jit  # noqa: E402
from payne_lite.emulator import KERNEL_COMPILER_OPTIONS  # noqa: E402
from payne_lite.observe import (  # noqa: E402
    cached_obs_model,
    embed_obs,
    normal_equations,
)

N_STARS = 128


def _best(fn, *args, rounds: int) -> float:
    """Best wall time [s] of ``fn(*args)`` over ``rounds`` calls (compiled first)."""
    jax.block_until_ready(fn(*args))
    best = np.inf
    for _ in range(rounds):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t)
    return best


#: How the profile's XLA ops of one evaluation are grouped (by name, first match;
#: XLA names a fusion after its root operations, ``ynn_fusion`` being a product
#: handed to YNNPACK); the rest is "other".
OP_GROUPS = (
    ("activations (tanh and its derivative)", ("tanh",)),
    ("rows of the flux and its derivatives", ("concatenate",)),
    ("products J^T W J, J^T W r", ("ynn", "dot")),
    ("Doppler taps (weighted rows x)", ("multiply", "select", "add")),
    ("copies", ("copy",)),
)


def _profile_ops(fn, args, n_stars: int) -> dict:
    """Exclusive device time per star [s] of each XLA op of ``fn(*args)``, from a
    ``jax.profiler`` trace of one call (its Perfetto JSON)."""
    import gzip
    import json
    import tempfile

    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            jax.block_until_ready(fn(*args))
        path = next(Path(tmp).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(path))["traceEvents"]
    names = {
        e["tid"]: e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    by_tid = defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "XLA" in str(names.get(e.get("tid"), "")):
            by_tid[e["tid"]].append(e)
    out = defaultdict(float)
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack = []
        for e in evs:
            while stack and stack[-1]["ts"] + stack[-1]["dur"] <= e["ts"]:
                stack.pop()
            e["excl"] = e["dur"]
            if stack:
                stack[-1]["excl"] -= e["dur"]
            stack.append(e)
        for e in evs:
            if "wait for completion" not in e["name"]:
                out[e["name"]] += e["excl"] * 1e-6 / n_stars
    return dict(out)


def _group(ops: dict) -> dict:
    """Sum :func:`_profile_ops`' ops into :data:`OP_GROUPS` (and "other")."""
    groups = defaultdict(float)
    for name, t in ops.items():
        key = next(
            (g for g, keys in OP_GROUPS if any(k in name for k in keys)),
            "other (loop, conditionals, thunk dispatch)",
        )
        groups[key] += t
    return dict(groups)


def _rates(rounds: int) -> tuple[float, float]:
    """(tanh/s, multiply-adds/s) XLA reaches on cache-resident float32 arrays,
    compiled like the kernel."""
    x = jnp.linspace(-3.0, 3.0, 8192, dtype=jnp.float32)
    reps = 256

    @jax.jit
    def tanh_loop(x):
        def body(_, y):
            return jnp.tanh(y) * 2.5

        return jax.lax.fori_loop(0, reps, body, x)

    coef = jnp.asarray(np.linspace(0.9, 1.1, 16), jnp.float32)

    @jax.jit
    def fma_loop(x, coef):
        def body(_, y):
            acc = y
            for c in range(16):
                acc = acc * coef[c] + y
            return acc * 1e-6

        return jax.lax.fori_loop(0, reps, body, x)

    tanh_loop = serial_jit(tanh_loop)
    fma_loop = serial_jit(fma_loop)
    t_tanh = _best(tanh_loop, x, rounds=rounds)
    t_fma = _best(fma_loop, x, coef, rounds=rounds)
    return x.size * reps / t_tanh, x.size * reps * 16 / t_fma


def _random_rows(n_pix: int, rounds: int) -> float:
    """Seconds per star of the activations and rows of random weights on
    ``n_pix`` rest pixels (5 labels, 5 hidden, 8 rows), and their product."""
    rng = np.random.default_rng(0)
    n_lab, n_hid, n_rows = 5, 5, 8
    f32 = jnp.float32
    w0 = jnp.asarray(rng.normal(size=(n_lab, n_hid, n_pix)), f32)
    b0 = jnp.asarray(rng.normal(size=(n_hid, n_pix)), f32)
    v = jnp.asarray(rng.normal(size=(n_rows, n_hid, n_pix)), f32)
    c = jnp.asarray(rng.normal(size=(n_rows, n_pix)), f32)

    def one(s):
        m = c
        for h in range(n_hid):
            z = b0[h]
            for j in range(n_lab):
                z = z + w0[j, h] * s[j]
            a, d = jax.jvp(jnp.tanh, (z,), (jnp.ones_like(z),))
            m = m + v[:, h] * jnp.where(jnp.arange(n_rows)[:, None] % 2 == 0, a, d)
        return (m @ m.T).sum()

    fn = serial_jit(
        jax.jit(lambda s: jax.lax.map(one, s), compiler_options=KERNEL_COMPILER_OPTIONS)
    )
    s = jnp.asarray(rng.normal(size=(N_STARS, n_lab)) * 0.3, f32)
    return _best(fn, s, rounds=rounds) / N_STARS


def _fit_stages(emu, net, mask, n, rounds):
    """Seconds per spectrum of a one-thread ``pl.fit``'s stages (best round)."""
    from payne_lite.fitting import _driver

    names = ("scan_batch", "screen_starts", "lm_batch", "rv_polish", "window_batch")
    labels, rv, flux, err, msk = bf.make_test_set(net, mask, n, 50.0, 0)
    opts = pl.LMOptions(n_threads=1)
    pl.fit(flux[:4], err[:4], emu, mask=msk[:4], options=opts)
    spent = defaultdict(float)
    orig = {k: getattr(_driver, k) for k in names}

    def timed(name):
        fn = orig[name]

        def call(*a, **kw):
            t = time.perf_counter()
            out = jax.block_until_ready(fn(*a, **kw))
            spent[name] += time.perf_counter() - t
            return out

        return call

    best, best_spent = np.inf, {}
    try:
        for k in names:
            setattr(_driver, k, timed(k))
        for _ in range(rounds):
            spent.clear()
            t = time.perf_counter()
            pl.fit(flux, err, emu, mask=msk, options=opts)
            wall = time.perf_counter() - t
            if wall < best:
                best, best_spent = wall, dict(spent)
    finally:
        for k, fn in orig.items():
            setattr(_driver, k, fn)
    best_spent["other (host: inputs, prepare, tables, S/N)"] = best - sum(
        best_spent.values()
    )
    return best / n, {k: v / n for k, v in best_spent.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--n-fit", type=int, default=512, help="mocks for the fit stages")
    args = ap.parse_args(argv)
    emu, net, apogee_mask = bf.load_data()
    obs, _ = cached_obs_model(emu, wavelength=None, cont_deg=0, rv_max=500.0)
    jet = obs.jet
    labels, rv, flux, err, mask = bf.make_test_set(net, apogee_mask, N_STARS, 50.0, 0)
    f32 = jnp.float32
    w = np.where(mask, 0.0, 1.0 / err**2)
    flux_e = embed_obs(obs, jnp.asarray(np.where(mask, 1.0, flux), f32))
    sw_e = embed_obs(obs, jnp.sqrt(jnp.asarray(w, f32)))
    p_true = np.column_stack([net.scale(labels), rv])
    p = jnp.asarray(p_true, f32)

    n_lab, n_hid = jet.w0.shape[0], jet.w0.shape[1]
    n_rest = jet.w0.shape[2]
    n_rows = jet.v.shape[0]
    n_emb = flux_e.shape[1]
    n_taps = len(pl.observe.TAP_OFFSETS[obs.interp])
    tanh_rate, fma_rate = _rates(args.rounds)
    print(
        f"payne_lite {pl.__version__}, jax {jax.__version__}; APOGEE network: {n_lab} "
        f"labels, {n_hid} hidden, {n_rest} rest / {n_emb} observed-span pixels, "
        f"{n_rows} rows, {n_taps} taps ({obs.interp}); one core, {N_STARS} stars, "
        f"best of {args.rounds}"
    )
    print(
        f"rates on cache-resident arrays (XLA, as the kernel is compiled): "
        f"tanh {tanh_rate / 1e9:.2f} G/s, multiply-add {fma_rate / 1e9:.2f} G/s"
    )
    ne = serial_jit(
        jax.jit(
            lambda p, f, s: jax.lax.map(lambda q: normal_equations(obs, *q), (p, f, s))
        )
    )
    t_ne = _best(ne, p, flux_e, sw_e, rounds=args.rounds) / N_STARS
    groups = _group(_profile_ops(ne, (p, flux_e, sw_e), N_STARS))
    # multiply-adds (and tanh) per star of each group, as the code computes them
    work = {
        OP_GROUPS[0][0]: (n_hid * n_rest, n_lab * n_hid * n_rest),
        OP_GROUPS[1][0]: (0, n_rows * n_hid * n_rest),
        OP_GROUPS[2][0]: (0, n_rows * n_rows * n_emb),
        OP_GROUPS[3][0]: (0, n_rows * n_taps * n_emb),
    }
    prof_total = sum(groups.values())
    print(
        f"\nnormal_equations: {t_ne * 1e6:.1f} us a star; its profile (one call under "
        f"jax.profiler, {prof_total * 1e6:.1f} us a star with the profiler's overhead):"
    )
    print(f"{'':44s} {'us/star':>8s} {'bound':>7s} {'x bound':>8s}")
    bound_total = 0.0
    for g, _ in (*OP_GROUPS, ("other (loop, conditionals, thunk dispatch)", ())):
        t = groups.get(g, 0.0)
        n_tanh, n_fma = work.get(g, (0, 0))
        bound = n_tanh / tanh_rate + n_fma / fma_rate
        bound_total += bound
        ratio = f"{t / bound:8.2f}" if bound else f"{'':8s}"
        print(f"  {g:42s} {t * 1e6:8.1f} {bound * 1e6:7.1f} {ratio}")
    print(
        f"  {'normal_equations (timed without profiler)':42s} {t_ne * 1e6:8.1f} "
        f"{bound_total * 1e6:7.1f} {t_ne / bound_total:8.2f}"
    )

    small, full = _random_rows(1000, args.rounds), _random_rows(n_rest, args.rounds)
    print(
        f"\nmemory: activations + rows + product with random weights: "
        f"{small / 1000 * 1e9:.2f} ns a pixel on 1,000 pixels (weights in cache), "
        f"{full / n_rest * 1e9:.2f} on {n_rest} (ratio {full / n_rest / (small / 1000):.2f})"
    )

    # the LM's own cost per evaluation
    from payne_lite.fitting._lm import lm_batch

    rng = np.random.default_rng(1)
    p0 = p_true.copy()
    p0[:, :n_lab] += rng.normal(0.0, 0.05, (N_STARS, n_lab))
    p0[:, n_lab] += rng.normal(0.0, 1.0, N_STARS)
    lo = np.tile(np.r_[np.full(n_lab, -0.5), -500.0], (N_STARS, 1))
    hi = -lo
    lo[:, n_lab], hi[:, n_lab] = rv - 20.0, rv + 20.0
    p0 = np.clip(p0, lo, hi)
    lm_args = (
        obs, jnp.asarray(p0[:, None], f32), jnp.ones((N_STARS, 1), bool),
        jnp.asarray(np.where(mask, 1.0, flux), f32), jnp.asarray(w, f32),
        jnp.asarray(lo, f32), jnp.asarray(hi, f32), jnp.ones(n_lab + 1, bool),
    )  # fmt: skip

    def lm(*a):
        return lm_batch(*a, max_iter=40)

    # the LM and the normal equations alone, interleaved in the same rounds (the
    # difference is small against the machine's drift between two timings)
    jax.block_until_ready(lm(*lm_args))
    t_lm = t_ne2 = np.inf
    for _ in range(args.rounds):  # both compiled and run above
        t = time.perf_counter()
        jax.block_until_ready(lm(*lm_args))
        t_lm = min(t_lm, (time.perf_counter() - t) / N_STARS)
        t = time.perf_counter()
        jax.block_until_ready(ne(p, flux_e, sw_e))
        t_ne2 = min(t_ne2, (time.perf_counter() - t) / N_STARS)
    evals = 1.0 + float(np.mean(np.asarray(lm(*lm_args)[2])))
    over = (t_lm - evals * t_ne2) / evals
    print(
        f"LM from 0.05 / 1 km/s off the truth: {t_lm * 1e6:.0f} us a star, "
        f"{evals:.2f} evaluations; the LM's own cost {over * 1e6:.1f} us an "
        f"evaluation ({over / t_ne2:.0%} of the normal equations, "
        f"{t_ne2 * 1e6:.1f} us in these rounds)"
    )

    per, stages = _fit_stages(emu, net, apogee_mask, args.n_fit, args.rounds)
    print(
        f"\npl.fit of {args.n_fit} mocks at S/N 50, one thread: {per * 1e6:.0f} us a "
        f"spectrum ({1 / per:.0f} spectra/s)"
    )
    for k, v in sorted(stages.items(), key=lambda kv: -kv[1]):
        print(f"  {k:44s} {v * 1e6:7.0f} us  {v / per:5.1%}")


if __name__ == "__main__":
    main()
