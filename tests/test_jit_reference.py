"""Guard against jaxlib builds that silently miscompile on CPU (jax-ml/jax#39103).

jaxlib 0.10.2 offloads some float32/float64 broadcast-multiply-reduce fusions to YNNPACK
on CPU and returns wrong numbers without any error. The emulator's forward pass is made
of such products and reductions, so these tests compare jitted JAX (the package's
``predict_batch`` and the bare einsum/broadcast forms) against NumPy float64 on the real
problem size: 7214 APOGEE pixels, 5 labels, 5 hidden units, a batch of 64 stars, with
the real Payne network (shipped in ``data/payne_apogee``). On a miscompiling jaxlib they
fail with a message that names the installed version and the workaround.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest

from payne_lite import Emulator, PixelNet
from payne_lite.emulator import _nets as nets_mod

N_PIX, N_HID, N_LAB, N_BATCH = 7214, 5, 5, 64
WORKAROUND = "--xla_cpu_experimental_ynn_fusion_type=-reduce"
KNOWN_BAD_JAXLIB = {"0.10.2"}


def _fail_message(what: str) -> str:
    return (
        f"jitted {what} disagrees with the NumPy float64 reference on "
        f"jax {jax.__version__} / jaxlib {jaxlib.__version__} "
        f"({jax.default_backend()}): this looks like the XLA:CPU miscompilation of "
        f"broadcast-multiply-reduce fusions (jax-ml/jax#39103). Install jaxlib 0.10.1 "
        f"or set XLA_FLAGS={WORKAROUND} before importing jax."
    )


def _assert_matches(actual, reference, dtype, what: str) -> None:
    """|actual - reference| <= tol(dtype) * max|reference|, elementwise."""
    actual = np.asarray(actual)
    assert actual.dtype == np.dtype(dtype), (what, actual.dtype)
    assert actual.shape == reference.shape, (what, actual.shape, reference.shape)
    tol = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}[np.dtype(dtype)]
    scale = float(np.abs(reference).max())
    err = np.abs(actual.astype(np.float64) - reference)
    bad = err > tol * scale
    assert not bad.any(), (
        f"{_fail_message(what)} {int(bad.sum())} of {bad.size} values off; "
        f"max |error| = {err.max():.3g} vs tolerance {tol * scale:.3g} "
        f"(first bad index {tuple(int(i) for i in np.argwhere(bad)[0])})"
    )


@pytest.fixture(scope="module")
def network(payne_data) -> dict[str, np.ndarray]:
    """The classic per-pixel Payne network, The Payne's real APOGEE one."""
    with np.load(payne_data.network) as d:
        net = {k: d[k] for k in d.files}
    assert net["w_array_0"].shape == (N_PIX, N_HID, N_LAB)
    return net


@pytest.fixture(scope="module")
def scaled_labels() -> np.ndarray:
    """(64, 5) scaled labels inside the training box [-0.5, 0.5]."""
    return np.random.default_rng(64).uniform(-0.5, 0.5, (N_BATCH, N_LAB))


def _reference_flux(net: dict, s: np.ndarray) -> np.ndarray:
    """The data README's formula in NumPy float64; flux (B, P)."""
    w0, b0, w1, b1 = (
        np.asarray(net[k], dtype=np.float64)
        for k in ("w_array_0", "b_array_0", "w_array_1", "b_array_1")
    )
    z = np.einsum("pjk,bk->bpj", w0, s) + b0
    return np.einsum("pj,bpj->bp", w1, 1.0 / (1.0 + np.exp(-z))) + b1


def _emulator(network: dict) -> Emulator:
    return Emulator(
        net=PixelNet(
            (network["w_array_0"], network["w_array_1"]),
            (network["b_array_0"], network["b_array_1"]),
        ),
        activation="sigmoid",
        label_names=[f"x{i}" for i in range(N_LAB)],
        label_units=[""] * N_LAB,
        label_lo=network["x_min"],
        label_hi=network["x_max"],
        wavelength=np.linspace(15168.0, 16937.0, N_PIX),
    )


DTYPES = [
    pytest.param(np.float32, id="float32"),
    pytest.param(np.float64, id="float64"),
]


def test_jaxlib_is_not_a_known_bad_build():
    """Fail outright on the known-bad build unless the documented workaround is set."""
    flags = os.environ.get("XLA_FLAGS", "")
    assert jaxlib.__version__ not in KNOWN_BAD_JAXLIB or WORKAROUND in flags, (
        _fail_message("code") + " (known-bad build installed without the workaround)"
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_batch_matches_numpy(network, scaled_labels, dtype):
    with jax.enable_x64(dtype == np.float64):
        net = PixelNet(
            tuple(
                jnp.asarray(network[k], dtype=dtype) for k in ("w_array_0", "w_array_1")
            ),
            tuple(
                jnp.asarray(network[k], dtype=dtype) for k in ("b_array_0", "b_array_1")
            ),
        )
        s = jnp.asarray(scaled_labels, dtype=dtype)
        flux = np.asarray(nets_mod.predict_batch(net, s, "sigmoid"))
    _assert_matches(
        flux,
        _reference_flux(network, scaled_labels),
        dtype,
        f"payne_lite.emulator.predict_batch ({N_BATCH} x {N_PIX} pixels)",
    )


@pytest.mark.parametrize("dtype", DTYPES)
def test_emulator_predict_matches_numpy(network, scaled_labels, dtype):
    """The same through the public object (label scaling, padding, device cache)."""
    emu = _emulator(network)
    labels = emu.unscale(scaled_labels)
    with jax.enable_x64(dtype == np.float64):
        flux = emu.predict(labels, dtype=dtype)
    _assert_matches(
        flux, _reference_flux(network, emu.scale(labels)), dtype, "Emulator.predict"
    )


_bmr = jax.jit(lambda A, W: jnp.sum(A[:, None, :] * W, axis=0))
_hidden = jax.jit(lambda s, W: jnp.sum(s[:, None, None, :] * W[None], axis=-1))
_output = jax.jit(lambda h, w: jnp.einsum("bph,ph->bp", h, w))


@pytest.mark.parametrize("n_mid", [N_HID, N_BATCH], ids=["hidden", "batch"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_multiply_reduce_leading_axis(n_mid, dtype):
    """sum_l A[l, p] * W[l, m, p]: A (5, 7214), W (5, m, 7214) -> (m, 7214)."""
    rng = np.random.default_rng(100 + n_mid)
    A = rng.standard_normal((N_LAB, N_PIX))
    W = rng.standard_normal((N_LAB, n_mid, N_PIX))
    with jax.enable_x64(dtype == np.float64):
        got = _bmr(jnp.asarray(A, dtype=dtype), jnp.asarray(W, dtype=dtype))
    ref = np.einsum(
        "lp,lmp->mp",
        A.astype(dtype).astype(np.float64),
        W.astype(dtype).astype(np.float64),
    )
    _assert_matches(got, ref, dtype, f"sum(A[:, None, :] * W, axis=0), W {W.shape}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_multiply_reduce_hidden_layer(network, scaled_labels, dtype):
    """The hidden pre-activations sum_l s[b, l] * w0[p, h, l]: (64, 7214, 5)."""
    w0 = network["w_array_0"]
    with jax.enable_x64(dtype == np.float64):
        got = _hidden(
            jnp.asarray(scaled_labels, dtype=dtype), jnp.asarray(w0, dtype=dtype)
        )
    ref = np.einsum(
        "bl,phl->bph",
        scaled_labels.astype(dtype).astype(np.float64),
        w0.astype(np.float64),
    )
    _assert_matches(got, ref, dtype, "sum(s[:, None, None, :] * w0[None], axis=-1)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_einsum_output_layer(network, dtype):
    """The output layer einsum('bph,ph->bp'): h (64, 7214, 5), w1 (7214, 5)."""
    h = np.random.default_rng(7).uniform(0.0, 1.0, (N_BATCH, N_PIX, N_HID))
    w1 = network["w_array_1"]
    with jax.enable_x64(dtype == np.float64):
        got = _output(jnp.asarray(h, dtype=dtype), jnp.asarray(w1, dtype=dtype))
    ref = np.einsum(
        "bph,ph->bp", h.astype(dtype).astype(np.float64), w1.astype(np.float64)
    )
    _assert_matches(got, ref, dtype, "einsum('bph,ph->bp')")


@pytest.mark.parametrize(
    ("dtype", "n"),
    [
        pytest.param(np.float32, 32_769, id="float32"),
        pytest.param(np.float64, 16_385, id="float64"),
    ],
)
def test_issue_39103_reproducer(dtype, n):
    """The upstream reproducer: vmapped matrix-vector product, then a reduction."""
    i = np.arange(n, dtype=np.float64)
    x = np.stack([i, np.zeros(n), np.zeros(n)], axis=1)
    with jax.enable_x64(dtype == np.float64):
        matrix = jnp.eye(3, dtype=dtype)
        f = jax.jit(jax.vmap(lambda row: jnp.sum((matrix @ row) ** 2)))
        got = f(jnp.asarray(x, dtype=dtype))
    _assert_matches(got, np.sum(x**2, axis=1), dtype, "vmap(sum((M @ row) ** 2))")
