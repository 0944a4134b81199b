"""payne_lite's hand-written batched LM against ``optimistix.LevenbergMarquardt``.

    python benchmarks/bench_optimistix.py                 # N=128 at S/N 100 and 30
    python benchmarks/bench_optimistix.py --n 32 --rounds 2 --tol 1e-3 1e-4 \
        --methods map-analytic map-analytic-clip

Issue 3 asks for batched Levenberg-Marquardt in JAX, "optionally optimistix if it
serves better than a hand-written loop: decide by measurement". This is the
measurement. Needs ``optimistix`` (not a payne_lite dependency): without it the
script exits with "skipped: optimistix not installed".

Same problem for every method: the noisy spectra of ``bench_fit.make_test_set`` (real
5-label APOGEE Payne network, rv uniform in +-200 km/s, APOGEE mask), the ObsModel,
pixel weights, start point and bounds of ``payne_lite.fit(method="lm")`` with
``cont_deg=0``: RV from payne_lite's scan (``_rvscan.scan_batch``), pixels valid over
the whole +-20 km/s RV window (``_rvscan.window_batch``), scaled labels starting at the box
centre (one start per star; ``fit`` screens three Teff starts, not done here), bounds
= training box and the RV window. Methods:

* ``payne_lite``: ``_lm.lm_batch`` (the hand-written loop: per-star early stopping
  inside the batch by ``lax.map`` + ``lax.cond`` over lanes, analytic Jacobian, normal
  equations), ``max_iter=100``.
* ``optx-vmap-<jac>``: ``jax.vmap`` over stars of ``optimistix.least_squares`` with
  ``optimistix.LevenbergMarquardt(rtol=tol, atol=tol)`` on the weighted residual
  ``sqrt(w) * (observe(obs, p(y))[0] - flux)``, ``max_steps=100``, ``throw=False``.
  optimistix has no box bounds, so the parameters are REPARAMETRISED:
  ``p = mid + half * sin(y)`` over each box (MINUIT-style; the starts, box-centre
  labels and the scan's rv at its window's centre, are y = 0), answer ``p(y)``.
  ``-clip`` variants use ``p = clip(y, lo, hi)`` instead: beyond a bound the
  residual is flat in that parameter, and LM can step there and stay (on this test
  set a few stars end on a box edge with chi2 worse by 10-1000).
  ``<jac>`` = ``fwd``: optimistix's default Jacobian (``jax.linearize`` of the
  residual, materialised by its QR solver: forward mode through the network AND the
  Doppler-shift gather); ``analytic``: the model wrapped in ``jax.custom_jvp`` whose
  rule is payne_lite's ``observe_jac_t`` (what ``_lm._lm_lanes`` uses).
* ``optx-map-<jac>``: the same per-star solve under ``jax.lax.map`` instead of
  ``vmap``: stars one after the other, so a finished star does not wait for the
  slowest one of the batch (under ``vmap`` the while loop runs until every star has
  stopped, every step costing the whole batch).

Reported per S/N and method: spectra/s after compilation (best of ``--rounds``
interleaved rounds, one jitted call for all N stars, on this shared machine, compare
only within a run), compile time (lower + compile, once per method: the S/N values
share the shapes), median / max steps per star (payne_lite: its ``n_iter``; optimistix:
``stats["num_steps"]``, accepted + rejected; each step is one residual + Jacobian
evaluation in both), stars not converged, and the largest |difference| of the fitted
scaled labels and rv from payne_lite's, in units of the statistical errors (sqrt of
the diagonal of ``(J^T W J)^-1`` at payne_lite's solution), plus the median and
largest chi2 difference against payne_lite's (negative = optimistix found a lower
chi2; float32, so |dchi2| below ~1e-2 is rounding), the number of stars with
dchi2 > 1 (a different, worse local minimum) and the largest differences over the
other stars ("same min").
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import the siblings as benchmarks.*
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    __package__ = "benchmarks"


def _import_optimistix():
    try:
        import optimistix as optx
    except ImportError:
        return None
    return optx


def prepare(emu, flux, err, mask, rv_range=(-500.0, 500.0)):
    """ObsModel, start p0 (n, k), flux (n, P), weights (n, P), bounds lo, hi (n, k) and
    the free mask (k,), as ``payne_lite.fit`` -> ``_driver._fit_batch`` builds them
    (cont_deg 0, box-centre labels, no broadening)."""
    import jax.numpy as jnp

    from payne_lite.fitting import _rvscan
    from payne_lite.observe import _problem, build_obs_model, param_layout

    obs = build_obs_model(emu, cont_deg=0, rv_max=max(abs(v) for v in rv_range))
    layout = param_layout(emu, cont_deg=0, rv_range=rv_range)
    dt = obs.x_obs.dtype
    n_pix = obs.x_obs.shape[0]
    flux2, ivar = _problem.check_inputs(flux, err, mask, n_pix)
    n, n_lab, k = flux2.shape[0], emu.n_labels, len(layout.names)
    n_steps = int(np.ceil((rv_range[1] - rv_range[0]) / _rvscan.RV_SCAN_STEP))
    rv_grid = jnp.asarray(np.linspace(rv_range[0], rv_range[1], n_steps + 1), dt)
    f_j = jnp.asarray(flux2, dt)
    b0 = jnp.zeros(0, dt)  # the broadening start values: none here
    rv0, _ = _rvscan.scan_batch(
        obs, jnp.zeros(n_lab, dt), b0, rv_grid, f_j, jnp.asarray(ivar, dt)
    )
    rv0 = np.asarray(rv0, np.float64)
    rv_lo = np.maximum(rv0 - _problem.RV_WINDOW, rv_range[0])
    rv_hi = np.minimum(rv0 + _problem.RV_WINDOW, rv_range[1])
    valid = np.asarray(
        _rvscan.window_batch(obs, jnp.asarray(rv_lo, dt), jnp.asarray(rv_hi, dt))
    )
    w = np.where(valid, ivar, 0.0)
    lo = np.broadcast_to(layout.lower, (n, k)).copy()
    hi = np.broadcast_to(layout.upper, (n, k)).copy()
    lo[:, n_lab], hi[:, n_lab] = rv_lo, rv_hi
    p0 = np.zeros((n, k))
    p0[:, n_lab] = rv0
    p0 = np.clip(p0, lo, hi)
    free = np.ones(k, bool)
    as_j = lambda a: jnp.asarray(a, dt)  # noqa: E731
    return obs, as_j(p0), f_j, as_j(w), as_j(lo), as_j(hi), jnp.asarray(free)


# --------------------------------------------------------------------------------------
# Solvers: each a function (obs, p0, flux, w, lo, hi, free) -> (p, n_steps, converged)
# --------------------------------------------------------------------------------------
def _compiler_options():
    """The XLA options payne_lite compiles its LM with (if any), for every method."""
    from payne_lite import emulator

    return getattr(emulator, "KERNEL_COMPILER_OPTIONS", None)


class Solver:
    """A jitted solver, lowered and compiled once; ``__call__`` returns
    (p (n, k), steps (n,), converged (n,), J^T W J (n, k, k) or None)."""

    def __init__(self, jitted, wrap=lambda data: (data, {}), post=lambda out: out):
        self.jitted, self.wrap, self.post = jitted, wrap, post
        self.compiled = None

    def compile(self, data):
        args, kwargs = self.wrap(data)
        self.compiled = self.jitted.lower(*args, **kwargs).compile()

    def __call__(self, data):
        return self.post(self.compiled(*self.wrap(data)[0]))


def payne_lite_solver(max_iter):
    """``_lm.lm_batch``, called as payne_lite calls it (top-level jit, own
    compiler options), one start per star."""
    import jax.numpy as jnp

    from payne_lite.fitting import _lm

    def wrap(data):
        obs, p0, flux, w, lo, hi, free = data
        alive = jnp.ones((p0.shape[0], 1), bool)
        args = (obs, p0[:, None], alive, flux, w, lo, hi, free)
        return args, {"max_iter": max_iter}

    def post(out):
        p, _, it, conv, a, _ = out
        return p[:, 0], it[:, 0], conv[:, 0], a[:, 0]

    return Solver(_lm.lm_batch, wrap, post)


def _analytic_model():
    """``observe(obs, p)[0]`` with payne_lite's analytic Jacobian as its JVP."""
    import jax

    from payne_lite.observe import observe, observe_jac_t

    @jax.custom_jvp
    def model(p, obs):
        return observe(obs, p)[0]

    @model.defjvp
    def _jvp(primals, tangents):
        p, obs = primals
        dp = tangents[0]
        f, _, jac_t = observe_jac_t(obs, p)  # (k, P)
        return f, dp @ jac_t

    return model


def optx_solver(optx, tol, max_iter, jac="fwd", batch="vmap", bounds="sin"):
    """``optimistix.LevenbergMarquardt`` per star; ``bounds``: "sin" solves for ``y``
    with ``p = mid + half * sin(y)`` (box-centred, MINUIT-style), "clip" for
    ``p = clip(y, lo, hi)``."""
    import jax
    import jax.numpy as jnp

    from payne_lite.observe import observe

    if jac == "analytic":
        model = _analytic_model()
    else:

        def model(p, obs):
            return observe(obs, p)[0]

    def to_p(y, lo, hi):
        if bounds == "clip":
            return jnp.clip(y, lo, hi)
        return 0.5 * (lo + hi) + 0.5 * (hi - lo) * jnp.sin(y)

    def to_y(p, lo, hi):
        if bounds == "clip":
            return p
        return jnp.arcsin(jnp.clip((2 * p - lo - hi) / (hi - lo), -1.0, 1.0))

    def residual(y, args):
        obs, flux, sw, lo, hi = args
        return sw * (model(to_p(y, lo, hi), obs) - flux)

    solver = optx.LevenbergMarquardt(rtol=tol, atol=tol)

    def one(obs, p0, flux, w, lo, hi):
        sol = optx.least_squares(
            residual,
            solver,
            to_y(p0, lo, hi),
            args=(obs, flux, jnp.sqrt(w), lo, hi),
            max_steps=max_iter,
            throw=False,
        )
        ok = sol.result == optx.RESULTS.successful
        return to_p(sol.value, lo, hi), sol.stats["num_steps"], ok, None

    def solve(obs, p0, flux, w, lo, hi, free):
        del free  # all free here
        if batch == "vmap":
            return jax.vmap(one, in_axes=(None, 0, 0, 0, 0, 0))(
                obs, p0, flux, w, lo, hi
            )
        return jax.lax.map(lambda a: one(obs, *a), (p0, flux, w, lo, hi))

    opts = _compiler_options()
    jitted = jax.jit(solve, compiler_options=opts) if opts else jax.jit(solve)
    return Solver(jitted)


def chi2_of(obs, p, flux, w):
    import jax

    from payne_lite.observe import observe

    @jax.jit
    def f(obs, p, flux, w):
        return jax.lax.map(
            lambda a: a[2] @ (observe(obs, a[0])[0] - a[1]) ** 2, (p, flux, w)
        )

    return np.asarray(f(obs, p, flux, w), np.float64)


# --------------------------------------------------------------------------------------
def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=128, help="spectra per S/N")
    ap.add_argument("--snr", type=float, nargs="+", default=[100.0, 30.0])
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (best kept)")
    ap.add_argument(
        "--tol",
        type=float,
        nargs="+",
        default=[1e-2, 1e-3],
        help="optimistix rtol = atol values to try",
    )
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--methods",
        nargs="+",
        default=[
            "vmap-fwd",
            "vmap-analytic",
            "map-fwd",
            "map-analytic",
            "map-analytic-clip",
        ],
        help="optimistix variants {vmap,map}-{fwd,analytic}[-clip] (default bounds: "
        "sin reparametrisation; -clip: clip inside the residual)",
    )
    args = ap.parse_args(argv)

    optx = _import_optimistix()
    if optx is None:
        sys.exit("skipped: optimistix not installed (pip install optimistix)")
    import jax

    import payne_lite as pl

    from . import bench_fit

    emu, net, apogee_mask = bench_fit.load_data()
    print(
        f"payne_lite {pl.__version__}, jax {jax.__version__}, optimistix "
        f"{getattr(optx, '__version__', '?')} ({jax.devices()[0].platform}, float "
        f"{'64' if jax.config.jax_enable_x64 else '32'}); N = {args.n} per S/N, "
        f"seed {args.seed}, best of {args.rounds} interleaved rounds; "
        f"compiler options {_compiler_options()}"
    )
    solvers = {"payne_lite": payne_lite_solver(args.max_iter)}
    for tol in args.tol:
        for m in args.methods:
            batch, jac, *rest = m.split("-")
            bounds = rest[0] if rest else "sin"
            solvers[f"optx-{m} tol={tol:g}"] = optx_solver(
                optx, tol, args.max_iter, jac=jac, batch=batch, bounds=bounds
            )
    compile_s = {}
    n_lab = emu.n_labels
    for i, snr in enumerate(args.snr):
        _, _, flux, err, mask = bench_fit.make_test_set(
            net, apogee_mask, args.n, snr, args.seed + i
        )
        data = prepare(emu, flux, err, mask)
        obs, f_j, w_j = data[0], data[2], data[3]
        out, best = {}, {}
        for name, fn in solvers.items():
            if name not in compile_s:
                t0 = time.perf_counter()
                fn.compile(data)
                compile_s[name] = time.perf_counter() - t0
            out[name] = jax.block_until_ready(fn(data))  # warm
        for _ in range(args.rounds):
            for name, fn in solvers.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(data))
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        p_ref, _, _, a_ref = out["payne_lite"]
        p_ref = np.asarray(p_ref, np.float64)
        cov = np.linalg.inv(np.asarray(a_ref, np.float64))
        sig = np.sqrt(np.diagonal(cov, axis1=1, axis2=2))
        chi2_ref = chi2_of(obs, out["payne_lite"][0], f_j, w_j)
        print(
            f"\nS/N {snr:g}: median sigma: scaled labels "
            + " ".join(f"{v:.2g}" for v in np.median(sig[:, :n_lab], axis=0))
            + f", rv {np.median(sig[:, n_lab]):.3g} km/s"
        )
        print(
            f"{'method':<32} {'spec/s':>7} {'compile':>7} {'steps':>7} {'!conv':>5} "
            f"{'max|dlab|':>9} {'max|drv|':>8} {'same min':>11} {'dchi2':>9} "
            f"{'dchi2':>8} {'n':>3}\n"
            f"{'':<32} {'':>7} {'[s]':>7} {'med/max':>7} {'':>5} "
            f"{'[sigma]':>9} {'[sigma]':>8} {'lab / rv':>11} {'median':>9} "
            f"{'max':>8} {'>1':>3}"
        )
        for name in solvers:
            p, it, conv = (np.asarray(x) for x in out[name][:3])
            dz = np.abs(np.asarray(p, np.float64) - p_ref) / sig
            dchi2 = chi2_of(obs, out[name][0], f_j, w_j) - chi2_ref
            same = dchi2 <= 1.0  # same local minimum as payne_lite's (or a lower one)
            dz_same = np.where(same[:, None], dz, 0.0)
            print(
                f"{name:<32} {args.n / best[name]:7.1f} {compile_s[name]:7.1f} "
                f"{np.median(it):3.0f}/{int(np.max(it)):<3d} "
                f"{np.count_nonzero(~conv):5d} {np.max(dz[:, :n_lab]):9.2g} "
                f"{np.max(dz[:, n_lab]):8.2g} {np.max(dz_same[:, :n_lab]):5.2g}/"
                f"{np.max(dz_same[:, n_lab]):<5.2g} {np.median(dchi2):+9.1e} "
                f"{np.max(dchi2):+8.2g} {np.count_nonzero(~same):3d}"
            )


if __name__ == "__main__":
    main()
