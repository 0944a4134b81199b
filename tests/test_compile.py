"""Compilation: one executable per fit configuration whatever the number of spectra,
and JAX's persistent cache across processes (payne_lite._compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import payne_lite as pl
from payne_lite._compile import CompileCounter

ROOT = Path(__file__).resolve().parents[1]


def _mock(emu, n, seed, snr=50.0):
    """Rest-frame mock spectra of ``emu`` (n, P): labels in the middle of the box,
    Gaussian noise, one chunk of NaN pixels each (150, at most P/8; as real spectra
    have)."""
    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, emu.n_labels))
    flux = emu.predict(labels) + rng.normal(0.0, 1.0 / snr, (n, emu.n_pix))
    chunk = min(150, emu.n_pix // 8)
    for i, a in enumerate(rng.integers(0, emu.n_pix - chunk, n)):
        flux[i, a : a + chunk] = np.nan
    return flux, np.full_like(flux, 1.0 / snr)


def test_fits_of_any_size_reuse_the_first_calls_executables(payne_apogee):
    """The issue's check: after a first fit (of one spectrum), fits of 1, 7, 300
    and 1,000 spectra of the real APOGEE network trace and compile nothing new:
    every batch has ``LMOptions.batch_size`` rows, the rescue of doubtful fits runs
    in the main LM's shape, and the counts come from JAX's own events."""
    emu, _ = payne_apogee
    flux, err = _mock(emu, 1000, seed=1)
    first = pl.fit(flux[:1], err[:1], emu)
    with CompileCounter() as cc:
        tables = {n: pl.fit(flux[:n], err[:n], emu) for n in (1, 7, 300, 1000)}
    assert cc.traces == 0 and cc.compiles == 0, dict(cc.events)
    # the same spectrum gives the same answer in any batch (padding is inert)
    for n, t in tables.items():
        for name in ("Teff", "logg", "rv", "chi2"):
            np.testing.assert_array_equal(t[name][:1], first[name], err_msg=f"{n}")
    # and the rescue ran in that shape: some of 1,000 were doubtful enough
    assert np.all(np.isfinite(tables[1000]["chi2"]))


def _run_child(tmp_path, env_extra) -> dict:
    """A fresh process that fits 3 spectra of a small log-grid emulator; prints its
    compile counts, cache directory and the fitted labels as JSON."""
    emu_file = tmp_path / "emu.h5"
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import numpy as np
import payne_lite as pl
from payne_lite._compile import CompileCounter
emu = pl.Emulator.load({str(emu_file)!r})
rng = np.random.default_rng(0)
lab = emu.label_lo + (emu.label_hi - emu.label_lo) * rng.uniform(0.3, 0.7, (3, 3))
flux = emu.predict(lab) + rng.normal(0, 0.01, (3, emu.n_pix))
with CompileCounter() as cc:
    t = pl.fit(flux, np.full_like(flux, 0.01), emu)
print(json.dumps(dict(traces=cc.traces, compiles=cc.compiles, loads=cc.loads,
                      cache_dir=pl.compilation_cache_dir(),
                      teff=[float(x) for x in t["Teff"]])))
"""
    env = {**os.environ, **env_extra}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    # the XLA:CPU AOT loader's false SIGILL warning is silenced (payne_lite._compile)
    assert "cpu_aot_loader" not in out.stderr, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_second_process_loads_from_the_persistent_cache(tmp_path):
    from conftest import build_log_emulator

    build_log_emulator().save(tmp_path / "emu.h5")
    cache = tmp_path / "jax-cache"
    env = {"PAYNE_LITE_COMPILATION_CACHE": str(cache)}
    cold = _run_child(tmp_path, env)
    assert cold["cache_dir"] == str(cache)
    assert cold["compiles"] > 10 and cold["loads"] == 0, cold
    assert any(cache.iterdir()), "nothing written to the cache"
    warm = _run_child(tmp_path, env)
    assert warm["compiles"] == 0 and warm["loads"] == cold["compiles"], warm
    assert warm["teff"] == cold["teff"]  # the loaded executables compute the same


def test_environment_switch_turns_the_cache_off_or_moves_it(tmp_path):
    """PAYNE_LITE_COMPILATION_CACHE set before ``import payne_lite``: ``off`` (or
    0 / false / no) leaves the cache off, a directory is used instead of the
    default; this process uses the run's own cache that conftest.py set up."""
    assert pl.compilation_cache_dir() == os.environ["PAYNE_LITE_COMPILATION_CACHE"]
    code = "import payne_lite as pl; print(repr(pl.compilation_cache_dir()))"
    for value, want in [
        ("off", None),
        ("0", None),
        ("No", None),
        (str(tmp_path / "here"), str(tmp_path / "here")),
    ]:
        env = {**os.environ, "PAYNE_LITE_COMPILATION_CACHE": value}
        out = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr[-3000:]
        assert eval(out.stdout.strip().splitlines()[-1]) == want, value  # noqa: S307


def test_user_cache_setting_is_kept_and_runtime_switch(tmp_path):
    """A JAX cache directory the user configured wins over payne_lite's default;
    ``set_compilation_cache`` turns the cache off and on at run time."""
    code = f"""
import jax
jax.config.update("jax_compilation_cache_dir", {str(tmp_path / "mine")!r})
import payne_lite as pl
a = pl.compilation_cache_dir()
pl.set_compilation_cache(None)
b = pl.compilation_cache_dir()
c = pl.set_compilation_cache({str(tmp_path / "other")!r})
print(repr((a, b, c, pl.compilation_cache_dir())))
"""
    env = {k: v for k, v in os.environ.items() if k != "PAYNE_LITE_COMPILATION_CACHE"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    a, b, c, d = eval(out.stdout.strip().splitlines()[-1])  # noqa: S307
    assert a == str(tmp_path / "mine")
    assert b is None
    assert c == d == str(tmp_path / "other")
    assert (tmp_path / "other").is_dir()


def test_lm_loop_runs_without_host_transfers(payne_apogee):
    """The LM loop (``lm_batch``: every star's iterations, their normal equations,
    the damped solves and the stopping rule) runs on the device from inputs already
    there, with no host round-trip: JAX's transfer guard refuses any implicit
    transfer in either direction, and the results stay device arrays."""
    import jax
    import jax.numpy as jnp

    from payne_lite.fitting._lm import lm_batch
    from payne_lite.observe import build_obs_model, param_layout

    emu, _ = payne_apogee
    obs = build_obs_model(emu, cont_deg=0)
    layout = param_layout(emu, cont_deg=0, rv_range=(-500.0, 500.0))
    flux, err = _mock(emu, 4, seed=3)
    w = np.where(np.isfinite(flux), 1.0 / err**2, 0.0)
    k = len(layout.names)
    p0 = np.zeros((4, 1, k))
    dt = obs.x_obs.dtype
    args = jax.device_put(
        (
            jnp.asarray(p0, dt),
            jnp.ones((4, 1), bool),
            jnp.asarray(np.nan_to_num(flux), dt),
            jnp.asarray(w, dt),
            jnp.asarray(np.broadcast_to(layout.lower, (4, k)), dt),
            jnp.asarray(np.broadcast_to(layout.upper, (4, k)), dt),
            jnp.ones(k, bool),
        )
    )
    max_iter = jnp.asarray(20)  # an argument of the program, on the device too
    lm_batch(obs, *args, max_iter=max_iter)  # compiled outside the guard
    with jax.transfer_guard("disallow"):
        out = lm_batch(obs, *args, max_iter=max_iter)
        assert all(isinstance(x, jax.Array) for x in out)
    _, chi2, it, *_ = out
    assert np.all(np.asarray(it) > 0) and np.all(np.isfinite(np.asarray(chi2)))


def test_log_posterior_of_any_number_of_points_compiles_once():
    """The samplers' public log posterior: after a first call, calls with 5, 64 and
    200 points reuse its executable, and a point's value does not depend on the
    call it is in."""
    from conftest import build_log_emulator

    emu = build_log_emulator()
    flux, err = _mock(emu, 1, seed=4)
    flux = np.nan_to_num(flux[0], nan=1.0)
    rng = np.random.default_rng(1)
    lo, hi = emu.label_lo, emu.label_hi
    pts = np.column_stack(
        [lo + (hi - lo) * rng.uniform(0.3, 0.7, (200, 3)), rng.uniform(-5, 5, 200)]
    )
    kw = dict(rv_centre=0.0)
    one = pl.log_posterior(flux, err[0], emu, pts[0], **kw)
    with CompileCounter() as cc:
        out = {
            n: pl.log_posterior(flux, err[0], emu, pts[:n], **kw) for n in (5, 64, 200)
        }
    assert cc.traces == 0 and cc.compiles == 0, dict(cc.events)
    assert np.all(np.isfinite(out[200]))
    assert out[5][0] == one
    np.testing.assert_array_equal(out[64], out[200][:64])
