"""Training: the LM step's maths, loss reduction, reproducibility, weights, sharding."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import payne_lite as pl
from payne_lite.emulator import PixelNet
from payne_lite.emulator import _train as T
from payne_lite.emulator import _train_steps as TS

ROOT = Path(__file__).resolve().parents[1]


def _teacher_grid(n_spec=240, n_pix=24, n_lab=3, n_hid=3, seed=1, noise_pixel=None):
    """Spectra made by a random per-pixel sigmoid network: a perfectly learnable grid."""
    rng = np.random.default_rng(seed)
    net = PixelNet(
        (
            rng.normal(0, 2.0, (n_pix, n_hid, n_lab)),
            rng.normal(0, 0.05, (n_pix, n_hid)),
        ),
        (rng.normal(0, 0.5, (n_pix, n_hid)), rng.normal(0.9, 0.02, n_pix)),
    )
    teacher = pl.Emulator(
        net=net,
        activation="sigmoid",
        label_names=[f"x{i}" for i in range(n_lab)],
        label_units=[""] * n_lab,
        label_lo=np.zeros(n_lab),
        label_hi=np.ones(n_lab),
        wavelength=15000.0 + np.arange(n_pix, dtype=float),
    )
    labels = rng.uniform(0, 1, (n_spec, n_lab))
    labels[0], labels[1] = 0.0, 1.0  # the box is [0, 1] exactly
    flux = teacher.predict(labels, dtype=np.float32)
    return pl.SpectralGrid(
        wavelength=teacher.wavelength,
        labels=labels,
        flux=flux,
        label_names=teacher.label_names,
        label_units=teacher.label_units,
    ), teacher


@pytest.mark.parametrize("activation", ["sigmoid", "tanh", "softplus"])
def test_analytic_jacobian_matches_jacfwd(activation):
    rng = np.random.default_rng(0)
    n_lab, hidden = 4, (3,)
    _, unravel = ravel_pytree(TS.pixel_template(n_lab, hidden))
    theta = jnp.asarray(
        TS.init_theta(rng, 7, n_lab, hidden, np.ones(7), 2.0, np.float32)
    )
    s = jnp.asarray(rng.uniform(-0.5, 0.5, (11, n_lab)), dtype=jnp.float32)
    f, jac = TS.fwd_jac(theta, s, unravel=unravel, activation=activation)
    one = functools.partial(TS._pixel_model, unravel=unravel, activation=activation)
    ref = jax.vmap(jax.vmap(jax.jacfwd(one), in_axes=(None, 0)), in_axes=(0, None))(
        theta, s
    )
    np.testing.assert_allclose(np.asarray(jac), np.asarray(ref), atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(f),
        np.asarray(TS.fwd(theta, s, unravel=unravel, activation=activation)),
        atol=1e-6,
    )


def _np_pixel(theta, s, n_lab, n_hid):
    """NumPy forward of one pixel; parameter order W0 (H,L), W1 (H), b0 (H), b1."""
    w0 = theta[: n_hid * n_lab].reshape(n_hid, n_lab)
    w1 = theta[n_hid * n_lab : n_hid * (n_lab + 1)]
    b0 = theta[n_hid * (n_lab + 1) : n_hid * (n_lab + 2)]
    return 1 / (1 + np.exp(-(s @ w0.T + b0))) @ w1 + theta[-1]


def test_lm_step_equals_a_hand_computed_damped_gauss_newton_step():
    """One LM step = theta - (J^T J + lam diag(J^T J) + eps I)^-1 J^T r, with J from
    central finite differences of an independent NumPy forward pass."""
    rng = np.random.default_rng(3)
    n_lab, n_hid, n, lam = 2, 3, 50, 1e-3
    _, unravel = ravel_pytree(TS.pixel_template(n_lab, (n_hid,)))
    theta0 = TS.init_theta(rng, 1, n_lab, (n_hid,), np.ones(1), 2.0, np.float64)[0]
    s = rng.uniform(-0.5, 0.5, (n, n_lab))
    y = _np_pixel(theta0 + rng.normal(0, 0.05, theta0.size), s, n_lab, n_hid)
    r = _np_pixel(theta0, s, n_lab, n_hid) - y
    h = 1e-6
    jac = np.column_stack(
        [
            (
                _np_pixel(theta0 + h * e, s, n_lab, n_hid)
                - _np_pixel(theta0 - h * e, s, n_lab, n_hid)
            )
            / (2 * h)
            for e in np.eye(theta0.size)
        ]
    )
    a = jac.T @ jac
    d = np.diag(a)
    delta = -np.linalg.solve(a + np.diag(lam * d + 1e-6 * d.max()), jac.T @ r)
    expect = theta0 + delta
    with jax.enable_x64(True):
        theta, lam_new, loss = TS.lm_step(
            jnp.asarray(theta0[None]),
            jnp.asarray([lam]),
            jnp.asarray(s),
            jnp.asarray(y[None]),
            jnp.ones((1, n)),
            unravel=unravel,
            activation="sigmoid",
        )
    np.testing.assert_allclose(np.asarray(theta[0]), expect, rtol=1e-6, atol=1e-8)
    # accepted step: loss is the new sum of squares, damping divided by 3
    new_r = _np_pixel(expect, s, n_lab, n_hid) - y
    assert float(loss[0]) == pytest.approx(new_r @ new_r, rel=1e-6)
    assert float(loss[0]) < r @ r
    assert float(lam_new[0]) == pytest.approx(lam / 3)


def _linalg_operands(jaxpr, names=("cholesky", "lu", "triangular_solve")):
    """Shapes of every LAPACK-backed primitive's first operand in ``jaxpr`` and its
    sub-jaxprs (loops, conditionals, calls)."""
    out = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            out.append((eqn.primitive.name, eqn.invars[0].aval.shape))
        for val in eqn.params.values():
            for sub in val if isinstance(val, tuple | list) else (val,):
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's Jaxpr
                if hasattr(sub, "eqns"):
                    out += _linalg_operands(sub, names)
    return out


def test_lm_step_calls_lapack_one_matrix_at_a_time():
    """The step's Cholesky solves run one pixel's matrix per call (``lax.map``):
    jaxlib's batched LAPACK kernels split a batch over XLA:CPU's intra-op pool and
    wait for it, which deadlocked training on 4 simulated devices at 256 pixels
    (every thread waiting in the Cholesky kernel's BlockingCounter). Checked on the
    step's program: no LAPACK call takes a batch of matrices."""
    n_lab, n_hid, c, n = 3, 4, 16, 40
    _, unravel = ravel_pytree(TS.pixel_template(n_lab, (n_hid,)))
    rng = np.random.default_rng(0)
    theta = TS.init_theta(rng, c, n_lab, (n_hid,), np.ones(c), 2.0, np.float32)
    args = (
        jnp.asarray(theta),
        jnp.full(c, 1e-3, jnp.float32),
        jnp.asarray(rng.uniform(-0.5, 0.5, (n, n_lab)), jnp.float32),
        jnp.ones((c, n), jnp.float32),
        jnp.ones((c, n), jnp.float32),
    )
    jaxpr = jax.make_jaxpr(
        functools.partial(TS.lm_step.__wrapped__, unravel=unravel, activation="tanh")
    )(*args)
    calls = _linalg_operands(jaxpr.jaxpr)
    n_par = theta.shape[1]
    assert ("cholesky", (n_par, n_par)) in calls, calls
    assert all(len(shape) == 2 for _, shape in calls), calls


def test_training_learns_a_teacher_network():
    grid, teacher = _teacher_grid()
    train, test = grid.split(0.25, seed=5)
    emu = pl.train_emulator(train, hidden=3, max_iter=60, progress=False)
    pred = emu.predict(test.labels)
    err = np.abs(pred - test.flux)
    baseline = np.abs(test.flux - train.flux.mean(axis=0))  # predict the mean spectrum
    assert np.median(err) < 0.02 * np.median(baseline)
    hist = emu.history
    assert hist["train_rms"][-1] < 0.1 * hist["train_rms"][0]
    # pixel_error is the held-out RMS of the kept parameters, one per pixel
    assert emu.pixel_error.shape == (grid.n_pix,)
    assert np.all(emu.pixel_error >= 0) and np.median(emu.pixel_error) < 0.05 * np.std(
        grid.flux
    )
    assert emu.meta["config"]["hidden"] == [3] or emu.meta["config"]["hidden"] == (3,)
    json.dumps(emu.meta)  # provenance must be storable


def test_adam_reduces_loss():
    grid, _ = _teacher_grid(n_spec=120, n_pix=8)
    emu = pl.train_emulator(
        grid,
        hidden=3,
        optimizer="adam",
        max_iter=40,
        learning_rate=3e-2,
        batch_size=32,
        progress=False,
    )
    assert emu.history["valid_rms"][-1] < 0.5 * emu.history["valid_rms"][0]


def test_training_is_reproducible_from_seed():
    grid, _ = _teacher_grid(n_spec=80, n_pix=6)
    a = pl.train_emulator(grid, hidden=2, max_iter=5, seed=3, progress=False)
    b = pl.train_emulator(grid, hidden=2, max_iter=5, seed=3, progress=False)
    c = pl.train_emulator(grid, hidden=2, max_iter=5, seed=4, progress=False)
    for wa, wb in zip(a.net.weights, b.net.weights, strict=True):
        np.testing.assert_array_equal(wa, wb)
    assert not np.array_equal(a.net.weights[0], c.net.weights[0])


def test_unusable_pixels_carry_no_weight():
    """Garbage flux with infinite error must not change the result at all."""
    grid, _ = _teacher_grid(n_spec=100, n_pix=5)
    err = np.full(grid.flux.shape, 0.01, dtype=np.float32)
    dirty_flux = np.array(grid.flux)
    dirty_flux[::7, 2] = 50.0
    err[::7, 2] = np.inf
    clean = pl.SpectralGrid(
        wavelength=grid.wavelength,
        labels=grid.labels,
        flux=grid.flux,
        label_names=grid.label_names,
        label_units=grid.label_units,
        flux_err=err,
    )
    dirty = pl.SpectralGrid(
        wavelength=grid.wavelength,
        labels=grid.labels,
        flux=dirty_flux,
        label_names=grid.label_names,
        label_units=grid.label_units,
        flux_err=err,
    )
    a = pl.train_emulator(clean, hidden=2, max_iter=8, progress=False)
    b = pl.train_emulator(dirty, hidden=2, max_iter=8, progress=False)
    np.testing.assert_allclose(a.net.weights[0], b.net.weights[0], rtol=1e-5, atol=1e-6)


def test_tracker_restarts_only_bad_stalled_pixels():
    cfg = pl.TrainConfig(patience=2, restart_threshold=3.0, max_restarts=1)
    tr = T._PixelTracker(4, cfg)
    vals = np.array([1.0, 1.0, 1.0, 100.0])
    for _ in range(3):  # no improvement after the first update -> all stall
        tr.update(vals, np.sqrt(vals))
    assert tr.to_restart().tolist() == [False, False, False, True]
    tr.restarts[3] = 1  # used up
    assert not tr.to_restart().any()
    tr.retire()
    assert not tr.active.any()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"hidden": 0}, "hidden"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"valid_fraction": 1.5}, "valid_fraction"),
        ({"activation": "cosh"}, "activation"),
        ({"max_iter": 0}, "max_iter"),
        ({"learning_rate": -1.0}, "learning_rate"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ValueError, match=match):
        pl.TrainConfig(**kw)


def test_constant_label_is_refused():
    grid, _ = _teacher_grid(n_spec=30, n_pix=4)
    labels = np.array(grid.labels)
    labels[:, 1] = 0.5
    g = pl.SpectralGrid(
        wavelength=grid.wavelength,
        labels=labels,
        flux=grid.flux,
        label_names=grid.label_names,
        label_units=grid.label_units,
    )
    with pytest.raises(ValueError, match="single value"):
        pl.train_emulator(g, hidden=2, max_iter=2, progress=False)


_SHARDED = textwrap.dedent("""
    import sys, numpy as np, jax
    sys.path.insert(0, {tests!r})
    from test_train import _teacher_grid
    import payne_lite as pl
    grid, _ = _teacher_grid(n_spec=90, n_pix=21)
    emu = pl.train_emulator(grid, hidden=3, max_iter=12, pixel_batch=8, progress=False)
    np.savez({out!r}, n_dev=len(jax.devices()),
             **{{f"w{{i}}": w for i, w in enumerate(emu.net.weights + emu.net.biases)}})
""")


def _train_in_subprocess(tmp_path, n_devices):
    out = tmp_path / f"dev{n_devices}.npz"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={n_devices}"
    )
    env["JAX_PLATFORMS"] = "cpu"
    code = _SHARDED.format(tests=str(ROOT / "tests"), out=str(out))
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, cwd=ROOT, timeout=300
    )
    return np.load(out)


def test_sharded_training_on_4_devices_matches_one_device(tmp_path):
    one = _train_in_subprocess(tmp_path, 1)
    four = _train_in_subprocess(tmp_path, 4)
    assert int(one["n_dev"]) == 1 and int(four["n_dev"]) == 4
    for key in one.files:
        if key != "n_dev":
            np.testing.assert_allclose(
                four[key], one[key], rtol=1e-5, atol=1e-6, err_msg=key
            )


def test_emulator_box_is_the_grid_design_box():
    grid, _ = _teacher_grid(n_spec=40, n_pix=4)
    box = (np.full(3, -0.25), np.full(3, 1.5))
    g = pl.SpectralGrid(
        wavelength=grid.wavelength,
        labels=grid.labels,
        flux=grid.flux,
        label_names=grid.label_names,
        label_units=grid.label_units,
        box=box,
    )
    emu = pl.train_emulator(g, hidden=2, max_iter=2, progress=False)
    np.testing.assert_array_equal(emu.label_lo, box[0])
    np.testing.assert_array_equal(emu.label_hi, box[1])
    emu.predict(box[1])  # the box edge itself is inside
