"""How the fit's radial velocities behave on spectra the fitter did not shift itself.

    python benchmarks/bench_doppler.py                  # 1,000 stars, S/N 50, ~1 min
    python benchmarks/bench_doppler.py --n 300 --snr 100

Mock stars of the real APOGEE Payne network (``pl.datasets.payne_apogee()``), labels
uniform in the middle of its box as in ``bench_fit.py``, S/N ``--snr``, rv uniform in
+-200 km/s, each spectrum made four ways from the same rest-frame model and noise:

* ``linear``: shifted by linear interpolation on the rest grid (``np.interp``, The
  Payne's interpolant, and this fitter's before the cubic one);
* ``cubic``: shifted by a not-a-knot cubic spline through the rest model, chip by
  chip (``PayneNumpy.spline_shift``: bench_fit's mocks until the fitter's default
  became Lanczos-6);
* ``sinc``: shifted by Lanczos-8 (windowed sinc) interpolation, a band-limited
  shift (``PayneNumpy.sinc_shift``: bench_fit's mocks);
* ``rest``: not shifted (rv = 0 exactly: every pixel sits on a rest node, where a
  linear interpolant's chi2(rv) has a kink).

None of them is the fitter's own interpolant (twelve-tap Lanczos-6,
``payne_lite.observe.DOPPLER_INTERP``). ``--no-polish`` switches the fit's rv polish
off (to see whether it pays); ``--interp cubic6`` fits with Keys' six-tap cubic
convolution (the default before Lanczos-6); ``--interp linear`` with the linear
interpolant (the fitter before the cubic one, with today's polish, which probes
every fit as that fitter's did).

``--kernels`` (``--n 100 --snr 300`` for the issue's case): the interpolants' own
error. Where the truth is known (Gaussian lines sampled at integer pixels, one FWHM
at a time) the shift each interpolant's error reads as, in pixels; then on the real
network's spectra the rv that each interpolant implies relative to Lanczos-8 at
the fits of sinc-shifted mocks, beside the quoted rv error.

``--real``: instead of mocks, the real spectra of ``pl.datasets.payne_apogee()``
(one combined spectrum, three visits of a double-lined binary) fitted with the
linear and the cubic interpolant, and with the cubic one at instrumental resolutions
below the emulator's 22,500: chi2, rv and labels per fit.

Printed per set: the fraction of fitted rvs more than 3 (and 5) quoted sigma from
the truth (0.27 % expected for Gaussian errors), the 1-sigma coverage of rv and of
each label, and the LM iterations (median, mean, 90th percentile). The issue's
targets: beyond 3 sigma at most 0.6 %, and rest-frame spectra needing no more LM
steps than shifted ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_fit import BOX_FRACTION, load_data  # noqa: E402
from payne_lite.observe import DOPPLER_INTERP  # noqa: E402

RV_MAX = 200.0


def make_sets(net, amask, n: int, snr: float, seed: int):
    """Labels (n, L), rv (n,), and per set name (flux, err, mask)."""
    rng = np.random.default_rng(seed)
    half = BOX_FRACTION / 2
    s = rng.uniform(-half, half, (n, net.x_min.size))
    rv = rng.uniform(-RV_MAX, RV_MAX, n)
    noise = rng.normal(0.0, 1.0 / snr, (n, net.wave.size))
    err = np.full_like(noise, 1.0 / snr)
    sets = {}
    rest = np.stack([net.rest(si) for si in s])
    lin = np.stack([net.shift(f, v) for f, v in zip(rest, rv, strict=True)])
    cub = np.stack([net.spline_shift(f, v) for f, v in zip(rest, rv, strict=True)])
    cover = np.stack([amask | ~net.covered(v) for v in rv])
    sets["linear"] = (lin + noise, err, cover)
    cub_mask = cover | ~np.isfinite(cub)
    sets["cubic"] = (np.where(cub_mask, 1.0, cub) + noise, err, cub_mask)
    snc = np.stack([net.sinc_shift(f, v) for f, v in zip(rest, rv, strict=True)])
    snc_mask = cover | ~np.isfinite(snc)
    sets["sinc"] = (np.where(snc_mask, 1.0, snc) + noise, err, snc_mask)
    sets["rest"] = (rest + noise, err, np.broadcast_to(amask, rest.shape).copy())
    return net.unscale(s), rv, sets


def summarise(table, labels, rv_true, names) -> dict:
    out = {}
    d = np.asarray(table["rv"]) - rv_true
    e = np.asarray(table["rv_err"])
    with np.errstate(invalid="ignore"):
        z = np.abs(d) / e
    out["rv_beyond_3sigma"] = float(np.mean(~(z <= 3)))
    out["rv_beyond_5sigma"] = float(np.mean(~(z <= 5)))
    out["coverage"] = {"rv": float(np.mean(z < 1))}
    for j, name in enumerate(names):
        dj = np.asarray(table[name]) - labels[:, j]
        with np.errstate(invalid="ignore"):
            out["coverage"][name] = float(np.mean(np.abs(dj) < table[f"{name}_err"]))
    it = np.asarray(table["n_iter"])
    out["n_iter"] = dict(
        median=float(np.median(it)),
        mean=float(it.mean()),
        p90=float(np.percentile(it, 90)),
    )
    out["flagged"] = float(np.mean(np.asarray(table["flags"]) != 0))
    out["rescanned"] = int(table.meta.get("rv_rescanned", 0))
    return out


def instrument(kind: str, resolution=None):
    """The :class:`payne_lite.Instrument` that fits with the Doppler interpolant
    ``kind`` (and ``resolution``, if given)."""
    import payne_lite as pl

    return pl.Instrument(doppler=kind, resolution=resolution)


def real_spectra() -> dict:
    """chi2 of the real spectra, linear vs cubic vs Lanczos-6 interpolant, and the
    default (Lanczos-6) with an instrumental resolution below the emulator's."""
    import payne_lite as pl

    pa = pl.datasets.payne_apogee()
    emu, mask = pa.emulator(), pa.mask
    c, v = pa.combined_spectrum(), pa.visits()
    spectra = [(f"{c.star} combined", c.flux, c.flux_err)]
    spectra += [(f"{v.star} visit {i + 1}", v.flux[i], v.flux_err[i]) for i in range(3)]
    cases = [
        ("linear", None),
        ("cubic6", None),
        ("lanczos6", None),
        ("lanczos6", 21500.0),
        ("lanczos6", 19500.0),
    ]
    out = {}
    print(f"{'spectrum':<34} {'interp':<7} {'R':>6} {'chi2':>9} {'rv':>8} "
          f"{'Teff':>6} {'logg':>5} {'[Fe/H]':>6} {'vmacro':>6}")  # fmt: skip
    for name, f, e in spectra:
        for kind, res in cases:
            inst = instrument(kind, res)
            r = pl.fit(f[None], e[None], emu, mask=mask[None], instrument=inst)[0]
            out[f"{name} {kind} {res}"] = float(r["chi2"])
            print(f"{name:<34} {kind:<7} {res or 22500:6.0f} {r['chi2']:9.1f} "
                  f"{r['rv']:8.3f} {r['Teff']:6.0f} {r['logg']:5.2f} "
                  f"{r['[Fe/H]']:6.3f} {r[emu.label_names[-1]]:6.2f}")  # fmt: skip
    return out


def _kernel_weights(name: str, t: float):
    """(offsets, weights) of the interpolant ``name`` at fraction ``t``: "keys6"
    (the fitter's, from payne_lite), or "lanczosA" (sinc(x) sinc(x / A), 2A taps,
    normalised to sum 1)."""
    if name == "keys6":
        from payne_lite.observe import TAP_OFFSETS, tap_weights

        offs = np.asarray(TAP_OFFSETS["cubic6"])
        return offs, np.array([float(w) for w in tap_weights("cubic6", t)[0]])
    a = int(name.removeprefix("lanczos"))
    offs = np.arange(-a + 1, a + 1)
    w = np.sinc(t - offs) * np.sinc((t - offs) / a)
    return offs, w / w.sum()


KERNELS = ("keys6", "lanczos4", "lanczos6", "spline")


def kernels_ground_truth(seed: int = 0) -> dict:
    """Shift bias of each interpolant where the truth is known: 600 Gaussian
    absorption lines (depths 5-60 %) of one width on a unit continuum, sampled at
    integer pixels, interpolated at fractions 0.25, 0.5, 0.75 of a pixel and
    compared with the exact profile there; the bias is the shift (in pixels) that
    one Gauss-Newton step along the true profile's derivative reads from the
    interpolation error. Largest |bias| over the three fractions, per line FWHM."""
    from scipy.interpolate import CubicSpline

    rng = np.random.default_rng(seed)
    n = 4000
    out = {}
    for fwhm in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0):
        sig = fwhm / 2.3548
        c = rng.uniform(20, n - 20, 600)
        depth = rng.uniform(0.05, 0.6, 600)

        def f(x, c=c, depth=depth, sig=sig):
            return 1.0 - depth @ np.exp(-0.5 * ((x[None] - c[:, None]) / sig) ** 2)

        x = np.arange(n, dtype=np.float64)
        fs = f(x)
        idx = np.arange(20, n - 20)
        spline = CubicSpline(x, fs)
        row = {}
        for name in KERNELS:
            bias = []
            for t in (0.25, 0.5, 0.75):
                if name == "spline":
                    val = spline(idx + t)
                else:
                    offs, w = _kernel_weights(name, t)
                    val = fs[idx[:, None] + offs[None]] @ w
                e = val - f(idx + t)
                d = (f(idx + t + 1e-4) - f(idx + t - 1e-4)) / 2e-4
                bias.append(-(d @ e) / (d @ d))
            row[name] = float(np.max(np.abs(bias)))
        out[fwhm] = row
    return out


def kernels_real(emu, net, amask, n: int, snr: float, seed: int) -> dict:
    """On the real network's spectra: fit ``n`` sinc-shifted mocks at ``snr`` with
    the fitter, then read, at each best fit (labels held at the fit's, the fit's
    pixels), the rv that each interpolant's version of the same shifted rest model
    implies relative to Lanczos-8's (one Gauss-Newton step of the fit's estimator).
    Median and RMS |difference| [km/s], beside the median quoted rv error."""
    import jax
    import jax.numpy as jnp

    import payne_lite as pl
    from payne_lite.observe import build_obs_model, observe_jac

    labels, rv, sets = make_sets(net, amask, n, snr, seed)
    flux, err, mask = sets["sinc"]
    t = pl.fit(flux, err, emu, mask=mask)
    obs = build_obs_model(emu, interp="cubic6")  # "keys6" below
    jac = jax.jit(lambda p: observe_jac(obs, p))
    names = list(emu.label_names)
    diff = {k: [] for k in KERNELS}
    for i in range(n):
        s = emu.scale(np.array([t[c][i] for c in names]))
        v = float(t["rv"][i])
        model, valid, j = jac(jnp.asarray(np.r_[s, v], obs.x_obs.dtype))
        j = np.asarray(j, np.float64)
        w = np.where(~mask[i] & np.asarray(valid), 1.0 / err[i] ** 2, 0.0)
        g = np.linalg.solve(j.T @ (w[:, None] * j), (j * w[:, None]).T)[-1]
        rest = net.rest(s)
        ref = net.sinc_shift(rest, v, a=8)
        alt = {
            "keys6": np.asarray(model, np.float64),
            "lanczos4": net.sinc_shift(rest, v, a=4),
            "lanczos6": net.sinc_shift(rest, v, a=6),
            "spline": net.spline_shift(rest, v),
        }
        for k, a in alt.items():
            d = np.where(np.isfinite(a) & np.isfinite(ref) & (w > 0), ref - a, 0.0)
            diff[k].append(float(g @ d))
    return {
        "rv_err_median": float(np.median(t["rv_err"])),
        **{
            k: {
                "median": float(np.median(np.abs(v))),
                "rms": float(np.sqrt(np.mean(np.square(v)))),
            }
            for k, v in diff.items()
        },
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--snr", type=float, default=50.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--no-polish", action="store_true", help="switch the fit's rv polish off"
    )
    ap.add_argument(
        "--no-rescan",
        action="store_true",
        help="switch the fit's second RV scan (fits near a window's end) off",
    )
    ap.add_argument(
        "--interp", choices=("cubic6", "linear", "lanczos6"), default=DOPPLER_INTERP
    )
    ap.add_argument("--real", action="store_true", help="the real-spectrum check")
    ap.add_argument(
        "--kernels", action="store_true", help="the interpolants' own shift bias"
    )
    args = ap.parse_args(argv)
    import payne_lite as pl

    if args.real:
        return real_spectra()
    if args.kernels:
        gt = kernels_ground_truth(args.seed)
        print("shift bias [pixels] of each interpolant, Gaussian lines of one FWHM")
        print("| line FWHM [px] | " + " | ".join(KERNELS) + " |")
        print("|---|" + "---|" * len(KERNELS))
        for fwhm, row in gt.items():
            print(
                f"| {fwhm:g} | " + " | ".join(f"{row[k]:.1e}" for k in KERNELS) + " |"
            )
        emu, net, amask = load_data()
        real = kernels_real(emu, net, amask, args.n, args.snr, args.seed)
        print(f"\nreal network, {args.n} sinc-shifted mocks at S/N {args.snr:g}: rv "
              f"implied relative to Lanczos-8 [km/s] (median quoted rv error "
              f"{real['rv_err_median']:.4f})")  # fmt: skip
        for k in KERNELS:
            print(f"  {k:<9} median {real[k]['median']:.4f}  rms {real[k]['rms']:.4f}")
        return {"ground_truth": gt, "real": real}
    if args.no_polish:  # the polish's caller gets its ``best`` tuple back unchanged
        import payne_lite.fitting._driver as driver

        driver.rv_polish = lambda *a, **k: a[8]
    if args.no_rescan:  # step 5 returns the fits as they are, none scanned again
        import payne_lite.fitting._fit as fit_mod

        fit_mod.rescan_fits = lambda ctx, flux2, ivar, res, *a: (
            res,
            np.zeros(flux2.shape[0], bool),
        )

    emu, net, amask = load_data()
    t0 = time.perf_counter()
    labels, rv, sets = make_sets(net, amask, args.n, args.snr, args.seed)
    print(f"{args.n} mock stars, S/N {args.snr:g}, rv +-{RV_MAX:g} km/s "
          f"(made in {time.perf_counter() - t0:.1f} s)")  # fmt: skip
    names = list(emu.label_names)
    res = {}
    for name, (flux, err, mask) in sets.items():
        truth = np.zeros_like(rv) if name == "rest" else rv
        t0 = time.perf_counter()
        table = pl.fit(flux, err, emu, mask=mask, instrument=instrument(args.interp))
        res[name] = summarise(table, labels, truth, names)
        res[name]["seconds"] = time.perf_counter() - t0
    cols = ["rv", *names]
    print(f"\n{'set':<8} {'>3sig':>6} {'>5sig':>6}  1-sigma coverage "
          f"({', '.join(cols)})  LM iterations med/mean/p90  flagged  rescanned  "
          "seconds")  # fmt: skip
    for name, r in res.items():
        cov = " ".join(f"{r['coverage'][c]:.2f}" for c in cols)
        it = r["n_iter"]
        print(
            f"{name:<8} {100 * r['rv_beyond_3sigma']:5.2f}% {100 * r['rv_beyond_5sigma']:5.2f}%"
            f"  {cov}  {it['median']:.0f}/{it['mean']:.2f}/{it['p90']:.0f}"
            f"  {100 * r['flagged']:.1f}%  {r['rescanned']}  {r['seconds']:.2f}"
        )
    print("\ntargets: rvs beyond 3 sigma <= 0.6 % (0.27 % expected); coverage "
          "0.62-0.74; rest-frame LM iterations no more than shifted ones")  # fmt: skip
    if args.json:
        args.json.write_text(
            json.dumps(
                dict(args=vars(args) | {"json": str(args.json)}, results=res), indent=1
            )
        )
    return res


if __name__ == "__main__":
    main()
