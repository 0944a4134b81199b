"""MDN benchmark (issue 4): calibration, speed, and whether it helps the fit.

    python benchmarks/bench_mdn.py                       # trains the MDN (2-5 min here)
    python benchmarks/bench_mdn.py --mdn mdn_apogee.h5   # reuse a trained MDN
    python benchmarks/bench_mdn.py --save mdn.h5 --json out.json

With the real 5-label Payne network (``pl.datasets.payne_apogee()``) as the emulator:

* Training: ``payne_lite.train_mdn(emu, seed=0)`` with its defaults (100,000
  simulated training spectra, 10,000 validation), wall time (target < 15 min).
* Calibration on 2,000 held-out simulated spectra (another seed; S/N log-uniform in
  20-200, rv uniform over the MDN's rv range, the training simulation's random masks
  and tilts): per label and rv the fraction of truths within 1 and 3 MDN sigma
  (targets 0.62-0.74 and >= 0.98), the median sigma and the robust scatter of
  mean - truth.
* Speed: MDN inference for 10,000 spectra (after a warm-up) against the time to fit
  them (``payne_lite.fit`` per spectrum on the 500 S/N-30 spectra below, times
  10,000; target: MDN < 1/10).
* It helps the fit: bench_fit's test set (500 spectra, S/N 30, seed 0, rv within
  +-200 km/s, the APOGEE mask): ``fit`` with the default multi-start path against
  ``fit(..., mdn=mdn)``: catastrophic failures (|dTeff| > 500 K or |drv| > 10 km/s or
  NaN), median and mean LM iterations, time per spectrum (MDN + fit; both warmed
  up, best of ``--rounds``), stars refitted without the MDN bounds, QA bit 64.
* Architecture (``--arch``): time of one training step of a small 1-D CNN on the
  full 7214-pixel spectra against the chosen fixed features (CCF + PCA) + MLP.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite.mdn import simulate

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"
from .bench_fit import CATASTROPHIC, PARAMS, load_data, make_test_set  # noqa: E402

CAL_1SIG = (0.62, 0.74)
CAL_3SIG = 0.98
SPEED_RATIO_MAX = 0.1


def calibration(mdn, emu, n, seed):
    rng = np.random.default_rng(seed)
    sim = simulate(emu, n, rng=rng, snr_range=(20.0, 200.0), rv_range=mdn.rv_range)
    mean, sigma = mdn.predict(sim["flux"], sim["err"], sim["mask"])
    truth = np.column_stack([sim["labels"], sim["rv"]])
    z = np.abs(mean - truth) / sigma
    out = {}
    for j, name in enumerate(mdn.output_names):
        d = mean[:, j] - truth[:, j]
        p16, p84 = np.nanpercentile(d, [16, 84])
        out[name] = dict(
            within_1sigma=float(np.mean(z[:, j] < 1)),
            within_3sigma=float(np.mean(z[:, j] < 3)),
            median_sigma=float(np.nanmedian(sigma[:, j])),
            scatter=float(0.5 * (p84 - p16)),
        )
    return out


def fit_stats(t, labels, rv):
    vals = np.column_stack([np.asarray(t[p], float) for p in PARAMS])
    truth = np.column_stack([labels, rv])
    d = vals - truth
    with np.errstate(invalid="ignore"):
        cat = ~(np.abs(d[:, 0]) <= CATASTROPHIC["Teff"]) | ~(
            np.abs(d[:, -1]) <= CATASTROPHIC["rv"]
        )
    it = np.asarray(t["n_iter"])
    return dict(
        catastrophic=int(cat.sum()),
        n_iter_median=float(np.median(it)),
        n_iter_mean=float(np.mean(it)),
        scatter={
            p: float(0.5 * np.subtract(*np.nanpercentile(d[:, j], [84, 16])))
            for j, p in enumerate(PARAMS)
        },
        flag64=int(np.count_nonzero(np.asarray(t["flags"]) & 64)),
        refit=int(np.count_nonzero(t["mdn_refit"])) if "mdn_refit" in t.colnames else 0,
    )


def helps_the_fit(mdn, emu, net, amask, rounds):
    labels, rv, flux, err, mask = make_test_set(net, amask, 500, snr=30, seed=0)
    runs = {
        "default (multi-start)": lambda: pl.fit(flux, err, emu, mask=mask),
        "with MDN": lambda: pl.fit(flux, err, emu, mask=mask, mdn=mdn),
    }
    for f in runs.values():  # warm-up: compile every shape
        f()
    best = dict.fromkeys(runs, np.inf)
    tables = {}
    for _ in range(rounds):
        for name, f in runs.items():
            t0 = time.perf_counter()
            tables[name] = f()
            best[name] = min(best[name], time.perf_counter() - t0)
    out = {}
    for name, t in tables.items():
        st = fit_stats(t, labels, rv)
        st["seconds_per_spectrum"] = best[name] / len(t)
        if "mdn_seconds" in t.meta:
            st["mdn_seconds_per_spectrum"] = t.meta["mdn_seconds"] / len(t)
        out[name] = st
    return out


def inference_speed(mdn, emu, n):
    rng = np.random.default_rng(7)
    sim = simulate(emu, 1024, rng=rng, snr_range=(20.0, 200.0), rv_range=mdn.rv_range)
    reps = -(-n // 1024)
    flux = np.tile(sim["flux"], (reps, 1))[:n]
    err = np.tile(sim["err"], (reps, 1))[:n]
    mask = np.tile(sim["mask"], (reps, 1))[:n]
    mdn.predict(flux[:1024], err[:1024], mask[:1024])  # warm-up
    t0 = time.perf_counter()
    mdn.predict(flux, err, mask)
    return time.perf_counter() - t0


def arch_timing(emu, batch=512, steps=5):
    """Seconds per Adam step: 1-D CNN on the full spectra vs the MLP on features."""
    import jax
    import jax.numpy as jnp
    import optax

    P = emu.n_pix
    key = jax.random.key(0)
    x = jax.random.normal(key, (batch, P, 2))  # flux/err-normalised + mask channel
    y = jnp.zeros((batch, 12))

    def cnn_init(key):
        chans = [2, 16, 32, 32, 32]
        ks = jax.random.split(key, len(chans))
        ws = [
            jax.random.normal(k, (7, a, b)) * 0.1
            for k, a, b in zip(ks[:-1], chans[:-1], chans[1:], strict=True)
        ]
        n_flat = chans[-1] * (P // 2 ** (len(chans) - 1))
        return ws, jax.random.normal(ks[-1], (n_flat, 12)) * 0.01

    def cnn(params, x):
        ws, wd = params
        h = x
        for w in ws:
            h = jax.lax.conv_general_dilated(
                h, w, (1,), "SAME", dimension_numbers=("NWC", "WIO", "NWC")
            )
            h = jax.nn.gelu(h)
            h = jax.lax.reduce_window(
                h, -jnp.inf, jax.lax.max, (1, 2, 1), (1, 2, 1), "VALID"
            )
        return h.reshape(h.shape[0], -1) @ wd

    def mlp_init(key):
        sizes = [79, 256, 256, 18]
        ks = jax.random.split(key, 3)
        return [
            jax.random.normal(k, (a, b)) * 0.05
            for k, a, b in zip(ks, sizes[:-1], sizes[1:], strict=True)
        ]

    def mlp(ws, x):
        h = x
        for w in ws[:-1]:
            h = jnp.tanh(h @ w)
        return h @ ws[-1]

    out = {}
    for name, init, f, xin, yin in [
        ("1-D CNN on 7214 pixels", cnn_init, cnn, x, y),
        (
            "MLP on 79 features",
            mlp_init,
            mlp,
            jax.random.normal(key, (batch, 79)),
            jnp.zeros((batch, 18)),
        ),
    ]:
        params = init(key)
        opt = optax.adam(1e-3)
        st = opt.init(params)

        @jax.jit
        def step(p, s, xb, yb, f=f, opt=opt):
            loss, g = jax.value_and_grad(lambda q: jnp.mean((f(q, xb) - yb) ** 2))(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s, loss

        params, st, loss = step(params, st, xin, yin)
        loss.block_until_ready()
        t0 = time.perf_counter()
        for _ in range(steps):
            params, st, loss = step(params, st, xin, yin)
        loss.block_until_ready()
        out[name] = (time.perf_counter() - t0) / steps
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mdn", help="use this trained MDN file instead of training")
    ap.add_argument("--save", help="save the trained MDN here")
    ap.add_argument("--n-cal", type=int, default=2000)
    ap.add_argument("--n-speed", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--arch", action="store_true", help="CNN vs MLP step timing")
    ap.add_argument("--json", help="write the numbers here")
    args = ap.parse_args(argv)
    emu, net, amask = load_data()
    res = {}
    if args.mdn:
        mdn = pl.MDN.load(args.mdn, emulator=emu)
        print(f"loaded {mdn} from {args.mdn}")
    else:
        t0 = time.perf_counter()
        mdn = pl.train_mdn(emu, seed=0)
        res["train_seconds"] = time.perf_counter() - t0
        print(f"trained {mdn} in {res['train_seconds']:.0f} s")
        if args.save:
            mdn.save(args.save)
    m = mdn.meta
    print(
        f"training: {m.get('epochs_run')} epochs, {m.get('train_seconds')} s "
        f"({m.get('simulate_seconds')} s simulating), best validation NLL "
        f"{m.get('best_valid_nll'):.3f}; target < 900 s: "
        f"{'PASS' if m.get('train_seconds', 1e9) < 900 else 'FAIL'}"
    )
    res["train"] = {k: m.get(k) for k in ("train_seconds", "simulate_seconds")}

    cal = calibration(mdn, emu, args.n_cal, seed=2026)
    res["calibration"] = cal
    print(
        f"\n=== calibration: {args.n_cal} held-out simulated spectra, S/N 20-200, "
        f"rv uniform in {mdn.rv_range} km/s ==="
    )
    print(
        f"  {'param':<11}{'<1 sigma':>10}{'<3 sigma':>10}{'med sigma':>12}"
        f"{'scatter':>11}  check"
    )
    for name, c in cal.items():
        ok = CAL_1SIG[0] <= c["within_1sigma"] <= CAL_1SIG[1] and (
            c["within_3sigma"] >= CAL_3SIG
        )
        print(
            f"  {name:<11}{c['within_1sigma']:>10.3f}{c['within_3sigma']:>10.3f}"
            f"{c['median_sigma']:>12.4g}{c['scatter']:>11.4g}  "
            f"{'PASS' if ok else 'FAIL'}"
        )

    fits = helps_the_fit(mdn, emu, net, amask, args.rounds)
    res["fit"] = fits
    print("\n=== fit: bench_fit test set, 500 spectra, S/N 30, seed 0 ===")
    print(
        f"  {'method':<24}{'catastr.':>9}{'med iter':>9}{'mean iter':>10}"
        f"{'ms/spec':>9}{'refit':>7}{'bit64':>7}  scatter Teff, logg, [Fe/H], rv"
    )
    for name, st in fits.items():
        sc = st["scatter"]
        print(
            f"  {name:<24}{st['catastrophic']:>9d}{st['n_iter_median']:>9.1f}"
            f"{st['n_iter_mean']:>10.2f}{1e3 * st['seconds_per_spectrum']:>9.2f}"
            f"{st['refit']:>7d}{st['flag64']:>7d}  {sc['Teff']:.1f} K, "
            f"{sc['logg']:.4f}, {sc['[Fe/H]']:.4f}, {sc['rv']:.3f} km/s"
        )
    a, b = fits["default (multi-start)"], fits["with MDN"]
    for text, ok in [
        ("catastrophic failures no more", b["catastrophic"] <= a["catastrophic"]),
        ("fewer LM iterations (median)", b["n_iter_median"] < a["n_iter_median"]),
        (
            "lower time per spectrum",
            b["seconds_per_spectrum"] < a["seconds_per_spectrum"],
        ),
    ]:
        print(f"  {text}: {'PASS' if ok else 'FAIL'}")

    t_mdn = inference_speed(mdn, emu, args.n_speed)
    t_fit = a["seconds_per_spectrum"] * args.n_speed
    res["speed"] = dict(mdn_seconds=t_mdn, fit_seconds_estimate=t_fit)
    print(
        f"\n=== speed: MDN inference for {args.n_speed} spectra {t_mdn:.2f} s; "
        f"fitting them (default path, {1e3 * a['seconds_per_spectrum']:.2f} ms per "
        f"spectrum) {t_fit:.1f} s; ratio {t_mdn / t_fit:.3f} (target < "
        f"{SPEED_RATIO_MAX}): {'PASS' if t_mdn < SPEED_RATIO_MAX * t_fit else 'FAIL'}"
    )
    if args.arch:
        arch = arch_timing(emu)
        res["arch"] = arch
        print("\n=== architecture: seconds per Adam step, batch 512 ===")
        for name, s in arch.items():
            print(f"  {name:<26}{s * 1e3:9.1f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
