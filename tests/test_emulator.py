"""Acceptance tests of payne_lite.Emulator.

Every numerical check compares with an independent NumPy float64 implementation of The
Payne's formulas (Ting et al. 2019; the data README), written here, never with stored
numbers. float64 checks run inside ``jax.enable_x64(True)``; nothing flips x64 globally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from pathlib import Path

import h5py
import jax
import numpy as np
import pytest
from conftest import restamp

import payne_lite
from payne_lite import DenseNet, Emulator, PixelNet, SpectralGrid
from payne_lite._compile import CompileCounter
from payne_lite.emulator import _emulator as emulator_mod
from payne_lite.emulator import _nets as nets_mod

#: Label order of ``nn_normalized_spectra_5label.npz`` (see the data README).
PAYNE_LABELS_5 = ("Teff", "logg", "[Fe/H]", "[alpha/Fe]", "vmacro")
PAYNE_UNITS_5 = ("K", "dex", "dex", "dex", "km/s")
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)


# --- independent NumPy references ---------------------------------------------------
def _np_activation(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if name == "tanh":
        return np.tanh(z)
    if name == "leaky_relu":  # The Payne: slope 0.01 below zero
        return np.where(z > 0.0, z, 0.01 * z)
    if name == "softplus":
        return np.logaddexp(0.0, z)
    if name == "silu":
        return z / (1.0 + np.exp(-z))
    raise KeyError(name)


def _scaled(x, x_min, x_max) -> np.ndarray:
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    return (x - x_min) / (x_max - x_min) - 0.5


def ref_pixel(weights, biases, x_min, x_max, x, activation="sigmoid") -> np.ndarray:
    """Per-pixel networks (The Payne's classic model, any depth); flux (n, P)."""
    w = [np.asarray(a, dtype=np.float64) for a in weights]
    b = [np.asarray(a, dtype=np.float64) for a in biases]
    s = _scaled(x, x_min, x_max)
    h = _np_activation(activation, np.einsum("pjk,nk->npj", w[0], s) + b[0])
    for wi, bi in zip(w[1:-1], b[1:-1], strict=True):
        h = _np_activation(activation, np.einsum("pij,npj->npi", wi, h) + bi)
    return np.einsum("pj,npj->np", w[-1], h) + b[-1]


def ref_payne_npz(d: dict, x) -> np.ndarray:
    """The data README's formula for the classic (sigmoid) per-pixel network."""
    return ref_pixel(
        [d["w_array_0"], d["w_array_1"]],
        [d["b_array_0"], d["b_array_1"]],
        d["x_min"],
        d["x_max"],
        x,
    )


def ref_dense_npz(d: dict, x) -> np.ndarray:
    """The Payne's 2-hidden-layer leaky-ReLU MLP (its ``spectral_model.py``)."""
    f = {k: np.asarray(v, dtype=np.float64) for k, v in d.items()}
    s = _scaled(x, f["x_min"], f["x_max"])
    inside = np.einsum("ij,nj->ni", f["w_array_0"], s) + f["b_array_0"]
    outside = (
        np.einsum("ij,nj->ni", f["w_array_1"], _np_activation("leaky_relu", inside))
        + f["b_array_1"]
    )
    return (
        np.einsum("ij,nj->ni", f["w_array_2"], _np_activation("leaky_relu", outside))
        + f["b_array_2"]
    )


def ref_emulator(emu: Emulator, x) -> np.ndarray:
    return ref_pixel(
        emu.net.weights, emu.net.biases, emu.label_lo, emu.label_hi, x, emu.activation
    )


def _predict(emu: Emulator, x, dtype, **kw) -> np.ndarray:
    """Predict in ``dtype``: float64 inside ``jax.enable_x64(True)``, else x64 off."""
    with jax.enable_x64(np.dtype(dtype) == F64):
        return emu.predict(x, dtype=dtype, **kw)


def _assert_close(actual, desired, tol: float, *, scale: float = 1.0, what: str = ""):
    np.testing.assert_allclose(
        actual, desired, rtol=0.0, atol=tol * scale, err_msg=what
    )


def _inside(rng, lo, hi, n) -> np.ndarray:
    return rng.uniform(lo, hi, size=(n, len(lo)))


def _emu_kwargs(emu: Emulator, **changes) -> dict:
    kw = {
        f.name: getattr(emu, f.name)
        for f in dataclasses.fields(emu)
        if not f.name.startswith("_")
    }
    kw.update(changes)
    return kw


DTYPES = [pytest.param(F32, id="float32"), pytest.param(F64, id="float64")]


# --- the real Payne networks ----------------------------------------------------------
@pytest.fixture(scope="module")
def apogee_wave(payne_data) -> np.ndarray:
    return payne_data.wavelength


def _load_payne(path, **kw):
    """The imported Emulator and the raw npz arrays (the independent reference)."""
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files}
    return Emulator.from_payne_npz(path, **kw), arrays


@pytest.fixture(scope="module")
def payne5(payne_data, apogee_wave):
    return _load_payne(
        payne_data.network,
        label_names=PAYNE_LABELS_5,
        label_units=PAYNE_UNITS_5,
        wavelength=apogee_wave,
    )


@pytest.fixture(scope="module")
def payne4(payne_data, apogee_wave):
    return _load_payne(
        payne_data.network_unnormalized,
        label_names=PAYNE_LABELS_5[:4],
        wavelength=apogee_wave,
        flux_scale=1e-6,
    )


def test_payne5_import(payne5, apogee_wave):
    emu, d = payne5
    assert emu.kind == "pixel" and emu.activation == "sigmoid"
    assert emu.label_names == PAYNE_LABELS_5 and emu.label_units == PAYNE_UNITS_5
    assert (emu.n_pix, emu.n_labels, emu.hidden) == (7214, 5, (5,))
    np.testing.assert_array_equal(emu.label_lo, d["x_min"])
    np.testing.assert_array_equal(emu.label_hi, d["x_max"])
    np.testing.assert_array_equal(emu.wavelength, apogee_wave)
    assert emu.meta["source"].endswith("nn_normalized_spectra_5label.npz")


@pytest.mark.parametrize(
    "dtype", [F32, F64, None], ids=["float32", "float64", "x64-default"]
)
def test_payne5_matches_reference(payne5, dtype, tol):
    emu, d = payne5
    x = _inside(np.random.default_rng(5), d["x_min"], d["x_max"], 100)
    ref = ref_payne_npz(d, x)
    want = F32 if dtype == F32 else F64
    with jax.enable_x64(want == F64):
        flux = emu.predict(x, dtype=dtype)
    assert flux.shape == (100, 7214) and flux.dtype == want
    # normalized flux is O(1): the README tolerance is absolute
    _assert_close(flux, ref, tol(want))


def test_payne4_unnormalized_matches_reference_float32(payne4, tol):
    emu, d = payne4
    x = _inside(np.random.default_rng(4), d["x_min"], d["x_max"], 100)
    ref = ref_payne_npz(d, x) / 1e6
    flux = _predict(emu, x, F32)
    assert flux.dtype == F32 and emu.meta["flux_scale"] == 1e-6
    # f_lambda is ~1e-5 here: an absolute 1e-5 would accept anything, so scale it
    _assert_close(flux, ref, tol(F32), scale=np.abs(ref).max())


def test_payne4_unnormalized_matches_reference_float64(payne4, tol):
    emu, d = payne4
    x = _inside(np.random.default_rng(4), d["x_min"], d["x_max"], 100)
    ref = ref_payne_npz(d, x) / 1e6
    flux = _predict(emu, x, F64)
    assert flux.dtype == F64
    _assert_close(flux, ref, tol(F64), scale=np.abs(ref).max())


# --- The Payne's dense 2-hidden-layer MLP ---------------------------------------------
def _write_dense_npz(path: Path, *, n_lab=4, h1=12, h2=9, n_pix=60, seed=3) -> dict:
    rng = np.random.default_rng(seed)
    d = dict(
        w_array_0=rng.normal(0, 1.0, (h1, n_lab)).astype(np.float32),
        w_array_1=rng.normal(0, 0.5, (h2, h1)).astype(np.float32),
        w_array_2=rng.normal(0, 0.3, (n_pix, h2)).astype(np.float32),
        b_array_0=rng.normal(0, 0.3, h1).astype(np.float32),
        b_array_1=rng.normal(0, 0.3, h2).astype(np.float32),
        b_array_2=(1.0 + rng.normal(0, 0.05, n_pix)).astype(np.float32),
        x_min=np.array([3500.0, 0.0, -2.5, -0.5])[:n_lab],
        x_max=np.array([7000.0, 5.0, 0.5, 1.0])[:n_lab],
    )
    np.savez(path, **d)
    return d


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_payne_mlp_matches_reference(tmp_path, dtype, tol):
    path = tmp_path / "payne_mlp.npz"
    d = _write_dense_npz(path)
    wave = np.linspace(15200.0, 15260.0, 60)
    emu = Emulator.from_payne_npz(path, label_names=PAYNE_LABELS_5[:4], wavelength=wave)
    assert emu.kind == "dense" and emu.activation == "leaky_relu"
    assert isinstance(emu.net, DenseNet) and emu.hidden == (12, 9)
    x = _inside(np.random.default_rng(6), d["x_min"], d["x_max"], 50)
    ref = ref_dense_npz(d, x)
    # the random weights must exercise both branches of the leaky ReLU
    s = _scaled(x, d["x_min"], d["x_max"])
    z0 = s @ d["w_array_0"].T.astype(float) + d["b_array_0"]
    assert (z0 > 0).any() and (z0 < 0).any()
    flux = _predict(emu, x, dtype)
    assert flux.shape == (50, 60) and flux.dtype == dtype
    _assert_close(flux, ref, tol(dtype), scale=np.abs(ref).max())


def test_from_payne_npz_needs_wavelength(tmp_path):
    path = tmp_path / "payne_mlp.npz"
    _write_dense_npz(path)
    with pytest.raises(ValueError, match="no wavelength array"):
        Emulator.from_payne_npz(path)


def test_from_payne_npz_refuses_non_network(tmp_path):
    path = tmp_path / "grid.npz"
    np.savez(path, labels=np.ones((3, 4)), spectra=np.ones((4, 5)))
    with pytest.raises(payne_lite.FileFormatError, match="not a Payne network"):
        Emulator.from_payne_npz(path, wavelength=np.arange(1.0, 6.0))


# --- tiny random emulators against the reference --------------------------------------
@pytest.mark.parametrize("activation", sorted(nets_mod.ACTIVATIONS))
def test_tiny_one_layer_matches_reference(make_emulator, activation, tol):
    emu = make_emulator(activation=activation, seed=11)
    x = _inside(np.random.default_rng(1), emu.label_lo, emu.label_hi, 16)
    ref = ref_emulator(emu, x)
    _assert_close(_predict(emu, x, F32), ref, tol(F32), scale=np.abs(ref).max())


@pytest.mark.parametrize("activation", ["sigmoid", "leaky_relu"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_two_layer_pixel_net_matches_reference(
    make_emulator, activation, dtype, tol
):
    emu = make_emulator(n_pix=20, n_hid=(4, 3), activation=activation, seed=12)
    assert emu.hidden == (4, 3)
    x = _inside(np.random.default_rng(2), emu.label_lo, emu.label_hi, 9)
    ref = ref_emulator(emu, x)
    _assert_close(_predict(emu, x, dtype), ref, tol(dtype), scale=np.abs(ref).max())


def test_tiny_float64_matches_reference(tiny_emulator, tol):
    x = _inside(
        np.random.default_rng(3), tiny_emulator.label_lo, tiny_emulator.label_hi, 25
    )
    ref = ref_emulator(tiny_emulator, x)
    _assert_close(
        _predict(tiny_emulator, x, F64), ref, tol(F64), scale=np.abs(ref).max()
    )


# --- the batched kernel: blocks of pixels, float32 tanh -------------------------------
def test_tanh_rational_max_error():
    """Every 61st float32 in [0, 10], both signs, and far out: |error| <= 4.5e-7."""
    bits = np.arange(0, np.float32(10.0).view(np.int32), 61, dtype=np.int32)
    x = bits.view(np.float32)
    x = np.concatenate([x, -x, np.float32([8.3, 8.31, 20.0, 1e30, -1e30, 3e38])])
    with jax.enable_x64(False):
        got = np.asarray(jax.jit(nets_mod.tanh_rational)(x))
    assert got.dtype == F32
    err = np.abs(got.astype(np.float64) - np.tanh(x.astype(np.float64)))
    assert err.max() <= 4.5e-7, (err.max(), x[err.argmax()])
    np.testing.assert_array_equal(got[: len(bits)], -got[len(bits) : 2 * len(bits)])


def test_kernel_activation_is_exact_unless_fast_float32_tanh():
    act = nets_mod._kernel_activation
    assert act("tanh", np.float32, True) is nets_mod.tanh_rational
    assert act("tanh", np.float32) is nets_mod.ACTIVATIONS["tanh"]
    assert act("tanh", np.float64, True) is nets_mod.ACTIVATIONS["tanh"]
    for name in ("leaky_relu", "softplus", "silu"):
        assert act(name, np.float32, True) is nets_mod.ACTIVATIONS[name]


def test_payne5_fast_tanh_matches_reference(payne5, tol):
    emu, d = payne5
    x = _inside(np.random.default_rng(55), d["x_min"], d["x_max"], 100)
    ref = ref_payne_npz(d, x)
    exact = _predict(emu, x, F32, fast_tanh=False)
    fast = _predict(emu, x, F32, fast_tanh=True)
    assert fast.dtype == F32 and fast.shape == (100, 7214)
    _assert_close(fast, ref, tol(F32))
    _assert_close(exact, ref, tol(F32))
    # tanh_rational's 4.5e-7 times sum_h |w1| <= 2.3, plus float32 rounding
    assert np.abs(fast - exact).max() < 1.5e-6
    np.testing.assert_array_equal(_predict(emu, x, F32), fast)  # the default
    with jax.enable_x64(True):  # float64 ignores fast_tanh: still exact
        fast64 = emu.predict(x, dtype=F64, fast_tanh=True)
    _assert_close(fast64, ref, tol(F64))


def test_payne5_default_predict_chunks_and_single_rows(payne5):
    """The real network through the default predict (tanh_rational, tree sums): a
    full chunk of 256, a last chunk padded from 44 rows (its 64-row branch) and one
    label vector (its 8-row branch) agree with The Payne's float64 formula to 1e-6
    and with ``fast_tanh=False`` to 1e-6, and a row does not depend on its call."""
    emu, d = payne5
    x = _inside(np.random.default_rng(300), d["x_min"], d["x_max"], 300)
    ref = ref_payne_npz(d, x)
    with jax.enable_x64(False):
        flux = emu.predict(x)
        exact = emu.predict(x, fast_tanh=False)
        one = emu.predict(x[290])
    assert flux.shape == (300, 7214) and flux.dtype == F32
    assert np.abs(flux - ref).max() < 1e-6
    assert np.abs(flux - exact).max() < 1e-6
    np.testing.assert_array_equal(one, flux[290])


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_exact_predict_agrees_with_kernel_forward(make_emulator, activation):
    """fast_tanh=False: the batched kernel and the fitter's single-star form agree to
    float32 rounding; the default (tanh_rational) is within 1.5e-6 of both."""
    emu = make_emulator(n_pix=70, n_hid=5, activation=activation, seed=70)
    x = _inside(np.random.default_rng(70), emu.label_lo, emu.label_hi, 9)
    with jax.enable_x64(False):
        k, act = emu.kernel_params(F32)
        s = jax.numpy.asarray(emu.scale(x), dtype=F32)
        one = np.stack([nets_mod.kernel_forward(k, row, act) for row in s])
        flux = emu.predict(x, fast_tanh=False)
        default = emu.predict(x)
    np.testing.assert_allclose(flux, one, rtol=0, atol=_ulp_scale(F32, one))
    assert np.abs(default - one).max() < 1.5e-6


@pytest.mark.parametrize("fast_tanh", [False, True], ids=["exact", "fast_tanh"])
@pytest.mark.parametrize("n_pix", [2, 63, 64, 65, 200])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_pixel_counts_around_the_block(
    make_emulator, n_pix, dtype, fast_tanh, tol
):
    """Pixel counts below, at and above the kernel's block size, padded and not."""
    assert nets_mod.PIXEL_BLOCK == 64
    emu = make_emulator(n_pix=n_pix, n_hid=4, seed=n_pix)
    x = _inside(np.random.default_rng(n_pix), emu.label_lo, emu.label_hi, 11)
    ref = ref_emulator(emu, x)
    flux = _predict(emu, x, dtype, fast_tanh=fast_tanh)
    assert flux.shape == (11, n_pix) and flux.dtype == dtype
    _assert_close(flux, ref, tol(dtype), scale=np.abs(ref).max())


# --- shapes, dtypes, batching ---------------------------------------------------------
def test_predict_shapes_and_dtypes(tiny_emulator):
    emu = tiny_emulator
    x = _inside(np.random.default_rng(0), emu.label_lo, emu.label_hi, 4)
    with jax.enable_x64(False):
        one = emu.predict(x[0])
        many = emu.predict(x)
        as_list = emu.predict(x[0].tolist())
        row = emu.predict(x[:1])
        none = emu.predict(np.empty((0, 3)))
    assert one.shape == (50,) and one.dtype == F32
    assert many.shape == (4, 50) and many.dtype == F32
    assert row.shape == (1, 50)
    assert none.shape == (0, 50)
    assert isinstance(one, np.ndarray) and isinstance(many, np.ndarray)
    np.testing.assert_array_equal(as_list, one)
    with jax.enable_x64(True):
        one64 = emu.predict(x[0])
        many64 = emu.predict(x)
    assert one64.shape == (50,) and one64.dtype == F64
    assert many64.shape == (4, 50) and many64.dtype == F64


def _ulp_scale(dtype, flux) -> float:
    """A few units in the last place of the largest flux: the reordering allowance."""
    return 4 * float(np.finfo(dtype).eps) * max(1.0, float(np.abs(flux).max()))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_equals_loop_of_singles(tiny_emulator, dtype):
    emu = tiny_emulator
    x = _inside(np.random.default_rng(8), emu.label_lo, emu.label_hi, 20)
    batch = _predict(emu, x, dtype)
    loop = np.stack([_predict(emu, row, dtype) for row in x])
    assert loop.dtype == batch.dtype == dtype
    np.testing.assert_allclose(loop, batch, rtol=0, atol=_ulp_scale(dtype, batch))


def test_varied_batch_sizes_agree_per_row(tiny_emulator):
    emu = tiny_emulator
    x = _inside(np.random.default_rng(9), emu.label_lo, emu.label_hi, 1000)
    full = _predict(emu, x, F32)
    atol = _ulp_scale(F32, full)
    for n in (1, 3, 17):
        np.testing.assert_allclose(
            _predict(emu, x[:n], F32),
            full[:n],
            rtol=0,
            atol=atol,
            err_msg=f"batch of {n}",
        )
    # explicit chunking (with a padded last chunk) gives the same rows
    np.testing.assert_allclose(
        _predict(emu, x, F32, batch_size=7), full, rtol=0, atol=atol
    )
    # the last, padded rows are real predictions, not padding
    np.testing.assert_allclose(
        full[-5:], ref_emulator(emu, x[-5:]), rtol=0, atol=1e-5 * np.abs(full).max()
    )


def test_predict_into_out(tiny_emulator):
    """``out=``: the flux is written into the caller's array, which is returned."""
    emu = tiny_emulator
    x = _inside(np.random.default_rng(10), emu.label_lo, emu.label_hi, 70)
    with jax.enable_x64(False):
        fresh = emu.predict(x)
        buf = np.full((70, 50), np.nan, np.float32)
        assert emu.predict(x, out=buf) is buf
        np.testing.assert_array_equal(buf, fresh)
        # a strided view works too; a single label vector takes a (P,) array
        big = np.zeros((70, 100), np.float32)
        emu.predict(x, out=big[:, ::2])
        np.testing.assert_array_equal(big[:, ::2], fresh)
        assert not big[:, 1::2].any()
        one = np.empty(50, np.float32)
        assert emu.predict(x[3], out=one) is one
        np.testing.assert_array_equal(one, fresh[3])
        for bad in (
            np.empty((70, 49), np.float32),
            np.empty((70, 50), np.float64),
            np.empty((50,), np.float32),
            [[0.0] * 50] * 70,
        ):
            with pytest.raises(ValueError, match="out must be a NumPy array"):
                emu.predict(x, out=bad)
        frozen = np.empty((70, 50), np.float32)
        frozen.setflags(write=False)
        with pytest.raises(ValueError, match="read-only"):
            emu.predict(x, out=frozen)


def test_large_results_reuse_freed_memory(tiny_emulator, monkeypatch):
    """Results of at least ``_outpool.MIN_BYTES`` reuse the memory of a freed earlier
    result, only once no array or view uses it; a live result is never written."""
    from payne_lite.emulator import _outpool

    monkeypatch.setattr(_outpool, "MIN_BYTES", 1)
    _outpool.clear()
    emu = tiny_emulator
    x = _inside(np.random.default_rng(11), emu.label_lo, emu.label_hi, 70)
    with jax.enable_x64(False):
        ref = emu.predict(x, out=np.empty((70, 50), np.float32))
        first = emu.predict(x)
        addr = first.ctypes.data
        view = first[5:7]
        del first  # the view keeps the memory in use
        second = emu.predict(x[::-1])
        assert second.ctypes.data != addr
        np.testing.assert_array_equal(view, ref[5:7])
        del view  # now free: the next result of at most twice its size reuses it
        third = emu.predict(x[:40])
        assert third.ctypes.data == addr
        assert third.flags.writeable and third.flags.c_contiguous
        np.testing.assert_array_equal(third, ref[:40])
        np.testing.assert_array_equal(second, ref[::-1])
        del third
        assert emu.predict(x[:30]).ctypes.data != addr  # 70 rows > 2 x 30: not reused
    _outpool.clear()
    assert not _outpool._free


def test_batch_size_must_be_positive(tiny_emulator):
    with pytest.raises(ValueError, match="batch_size must be > 0"):
        tiny_emulator.predict(np.full(3, 0.0) + tiny_emulator.label_lo, batch_size=0)


# --- bad labels -----------------------------------------------------------------------
@pytest.mark.parametrize("j", range(3))
@pytest.mark.parametrize("side", ["below", "above"])
def test_outside_box_raises_naming_label(tiny_emulator, j, side):
    emu = tiny_emulator
    x = np.tile(0.5 * (emu.label_lo + emu.label_hi), (4, 1))
    width = emu.label_hi[j] - emu.label_lo[j]
    x[2, j] = (
        emu.label_lo[j] - 0.01 * width
        if side == "below"
        else (emu.label_hi[j] + 0.01 * width)
    )
    name = re.escape(emu.label_names[j])
    with pytest.raises(ValueError, match=rf"labels\[2\] {name} = .* outside"):
        emu.predict(x)
    with pytest.raises(ValueError, match=rf"{name} = .*allow_outside=True"):
        emu.predict(x[2])
    # extrapolation on request follows the same formula
    flux = _predict(emu, x, F32, allow_outside=True)
    ref = ref_emulator(emu, x)
    _assert_close(flux, ref, 1e-5, scale=np.abs(ref).max())


def test_box_edges_are_inside(tiny_emulator):
    emu = tiny_emulator
    x = np.stack([emu.label_lo, emu.label_hi])
    ref = ref_emulator(emu, x)
    _assert_close(_predict(emu, x, F32), ref, 1e-5, scale=np.abs(ref).max())


BAD_LABELS = {
    "too_few_1d": (lambda lo, hi: lo[:2], r"labels \(2,\) must have 3 columns"),
    "too_many_1d": (
        lambda lo, hi: np.r_[lo, 0.0],
        r"labels \(4,\) must have 3 columns",
    ),
    "too_few_2d": (
        lambda lo, hi: np.tile(lo[:2], (5, 1)),
        r"labels \(5, 2\) must have 3 columns \(Teff, logg, \[Fe/H\]\)",
    ),
    "nan": (
        lambda lo, hi: np.where([False, True, False], np.nan, lo),
        r"labels has 1 non-finite value.*\(0, 1\)",
    ),
    "inf": (
        lambda lo, hi: np.where([True, False, False], np.inf, lo),
        r"labels has 1 non-finite",
    ),
    "nan_in_batch": (
        lambda lo, hi: np.where(np.eye(4, 3, k=-2) > 0, np.nan, hi),
        r"non-finite value.*\(2, 0\)",
    ),
    "3d": (lambda lo, hi: np.zeros((2, 2, 3)), r"labels must have 1 or 2 dimension"),
    "scalar": (lambda lo, hi: 5000.0, r"labels must have 1 or 2 dimension"),
    "text": (
        lambda lo, hi: ["hot", "dwarf", "poor"],
        r"labels must be a numeric array",
    ),
}


@pytest.mark.parametrize("case", list(BAD_LABELS))
@pytest.mark.parametrize("allow_outside", [False, True])
def test_bad_labels_raise(tiny_emulator, case, allow_outside):
    make, message = BAD_LABELS[case]
    labels = make(tiny_emulator.label_lo, tiny_emulator.label_hi)
    with pytest.raises(ValueError, match=message):
        tiny_emulator.predict(labels, allow_outside=allow_outside)


def test_predict_does_not_mutate_inputs(tiny_emulator):
    emu = tiny_emulator
    x = _inside(np.random.default_rng(4), emu.label_lo, emu.label_hi, 6)
    x_copy = x.copy()
    weights_before = [np.array(w, copy=True) for w in emu.net.weights + emu.net.biases]
    lo, hi = emu.label_lo.copy(), emu.label_hi.copy()
    first = _predict(emu, x, F32)
    np.testing.assert_array_equal(x, x_copy)
    for before, after in zip(
        weights_before, emu.net.weights + emu.net.biases, strict=True
    ):
        np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(emu.label_lo, lo)
    np.testing.assert_array_equal(emu.label_hi, hi)
    # read-only input works too, and gives the same answer
    x.setflags(write=False)
    np.testing.assert_array_equal(_predict(emu, x, F32), first)


# --- compile once ---------------------------------------------------------------------
def test_predict_does_not_retrace(make_emulator, monkeypatch):
    """Trace-time side effect: the hot path body runs only while compiling (once per
    branch of :func:`predict_chunk`), never again for another n."""
    traces = []
    original = nets_mod._pixel_batch_1layer

    def counted(*args, **kwargs):
        traces.append(args[1].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(nets_mod, "_pixel_batch_1layer", counted)
    emu = make_emulator(n_pix=37, seed=37)  # a pixel count no other test compiles
    x = _inside(np.random.default_rng(0), emu.label_lo, emu.label_hi, 300)
    cache_size = getattr(nets_mod.predict_chunk, "_cache_size", None)
    with jax.enable_x64(False):
        emu.predict(x[:5])
        n_first = len(traces)
        assert n_first >= 1, traces  # the counter sees the first compilation
        n_cached = cache_size() if cache_size else None
        for _ in range(3):
            emu.predict(x[:5])
        for n in (1, 2, 6, 7, 8, 5, 12, 16, 65, 300):  # chunks of one size, any n
            emu.predict(x[:n])
        assert len(traces) == n_first, f"predict retraced: {traces[n_first:]}"
        if cache_size:
            assert cache_size() == n_cached
        # another batch_size is a new compilation, then cached too
        emu.predict(x[:12], batch_size=4)
        n_second = len(traces)
        assert n_second > n_first
        emu.predict(x[:3], batch_size=4)
    assert len(traces) == n_second, traces


def _compile_events(counter) -> dict:
    return {k: v for k, v in counter.events.items() if v}


def test_predict_compiles_nothing_after_the_first_call(make_emulator):
    """One executable serves every n: chunks of a fixed size, only the last padded.

    Counted with ``jax.monitoring`` (payne_lite's CompileCounter): tracing to a jaxpr
    (also when the persistent cache then supplies the executable) and XLA's backend
    compile, in the real predict path (no monkeypatching).
    """
    emu = make_emulator(n_pix=41, seed=41)  # a pixel count no other test compiles
    x = _inside(np.random.default_rng(41), emu.label_lo, emu.label_hi, 1000)
    with jax.enable_x64(False):
        with CompileCounter() as first:
            full = emu.predict(x)
        assert first.traces >= 1, _compile_events(first)  # the counter sees compiles
        with CompileCounter() as later:
            rows = {n: emu.predict(x[:n]) for n in (1, 7, 300, 1000)}
            single = emu.predict(x[3])
    assert later.traces == 0 and later.compiles == 0, _compile_events(later)
    # the same executable for every n: a row's flux does not depend on its batch
    for n, flux in rows.items():
        np.testing.assert_array_equal(flux, full[:n], err_msg=f"predict of {n}")
    np.testing.assert_array_equal(single, full[3])


def test_dense_predict_compiles_nothing_after_the_first_call(tmp_path):
    path = tmp_path / "mlp.npz"
    d = _write_dense_npz(path, n_pix=43, h1=7, h2=5, seed=43)
    emu = Emulator.from_payne_npz(path, wavelength=np.linspace(15000.0, 15010.0, 43))
    x = _inside(np.random.default_rng(43), d["x_min"], d["x_max"], 300)
    with jax.enable_x64(False):
        full = emu.predict(x)
        with CompileCounter() as later:
            rows = {n: emu.predict(x[:n]) for n in (1, 7, 300)}
    assert later.traces == 0 and later.compiles == 0, _compile_events(later)
    for n, flux in rows.items():
        np.testing.assert_array_equal(flux, full[:n], err_msg=f"predict of {n}")


def test_predict_chunks_are_fixed_size(make_emulator, monkeypatch):
    """Every jitted call gets ``batch_size`` rows and the count of real ones; the rows
    of a partial last chunk are real predictions, and the padding never reaches the
    output."""
    calls = []
    original = emulator_mod.predict_chunk

    def recorded(net, s, n_valid, *args, **kwargs):
        calls.append((s.shape, n_valid))
        return original(net, s, n_valid, *args, **kwargs)

    monkeypatch.setattr(emulator_mod, "predict_chunk", recorded)
    emu = make_emulator(n_pix=40, seed=40)
    x = _inside(np.random.default_rng(40), emu.label_lo, emu.label_hi, 150)
    with jax.enable_x64(False):
        flux = emu.predict(x, batch_size=64)
        one = emu.predict(x[5], batch_size=64)
    assert calls == [((64, 3), 64), ((64, 3), 64), ((64, 3), 22), ((64, 3), 1)]
    assert flux.shape == (150, 40) and one.shape == (40,)
    ref = ref_emulator(emu, x)
    _assert_close(flux, ref, 1e-5, scale=np.abs(ref).max())
    np.testing.assert_array_equal(one, flux[5])


def test_predict_chunk_branches_agree(make_emulator):
    """predict_chunk evaluates only the first n_valid rows (rounded up to a branch);
    every branch gives the full chunk's rows exactly."""
    emu = make_emulator(n_pix=70, seed=70)
    k, act = emu.kernel_params(np.float32)
    x = _inside(np.random.default_rng(70), emu.label_lo, emu.label_hi, 128)
    s = jax.numpy.asarray(emu.scale(x), dtype=np.float32)
    with jax.enable_x64(False):
        full = np.asarray(nets_mod.predict_chunk(k, s, 128, act))
        for n in (1, 8, 9, 64, 65, 127):
            part = np.asarray(nets_mod.predict_chunk(k, s, n, act))
            np.testing.assert_array_equal(part[:n], full[:n], err_msg=f"n_valid={n}")
    ref = ref_emulator(emu, x)
    _assert_close(full, ref, 1e-5, scale=np.abs(ref).max())


def test_dense_predict_does_not_retrace(tmp_path, monkeypatch):
    traces = []
    original = nets_mod.dense_forward

    def counted(*args, **kwargs):
        traces.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(nets_mod, "dense_forward", counted)
    path = tmp_path / "mlp.npz"
    d = _write_dense_npz(path, n_pix=33, h1=7, h2=5, seed=33)
    emu = Emulator.from_payne_npz(path, wavelength=np.linspace(15000.0, 15010.0, 33))
    x = _inside(np.random.default_rng(1), d["x_min"], d["x_max"], 4)
    with jax.enable_x64(False):
        emu.predict(x)
        n_first = len(traces)
        assert n_first >= 1
        for n in (4, 4, 1, 3):
            emu.predict(x[:n])
    assert len(traces) == n_first


# --- model files ----------------------------------------------------------------------
def _assert_same_emulator(a: Emulator, b: Emulator) -> None:
    assert type(b.net) is type(a.net)
    assert b.kind == a.kind and b.activation == a.activation
    for wa, wb in zip(
        a.net.weights + a.net.biases, b.net.weights + b.net.biases, strict=True
    ):
        assert np.asarray(wb).dtype == np.asarray(wa).dtype
        np.testing.assert_array_equal(wb, wa)
    assert b.label_names == a.label_names and b.label_units == a.label_units
    np.testing.assert_array_equal(b.label_lo, a.label_lo)
    np.testing.assert_array_equal(b.label_hi, a.label_hi)
    np.testing.assert_array_equal(b.wavelength, a.wavelength)
    if a.pixel_error is None:
        assert b.pixel_error is None
    else:
        np.testing.assert_array_equal(b.pixel_error, a.pixel_error)
    assert sorted(b.history) == sorted(a.history)
    for key in a.history:
        np.testing.assert_array_equal(b.history[key], a.history[key], err_msg=key)
    assert b.meta == a.meta


def test_save_load_round_trip(tmp_path, tiny_emulator):
    path = tmp_path / "models" / "emu.h5"
    tiny_emulator.save(path)
    back = Emulator.load(path)
    _assert_same_emulator(tiny_emulator, back)
    x = _inside(np.random.default_rng(2), back.label_lo, back.label_hi, 10)
    for dtype in (F32, F64):
        np.testing.assert_array_equal(
            _predict(back, x, dtype), _predict(tiny_emulator, x, dtype)
        )
    assert [p.name for p in path.parent.iterdir()] == ["emu.h5"]


def test_save_load_round_trip_variants(tmp_path, make_emulator):
    deep = make_emulator(n_pix=20, n_hid=(4, 3), activation="silu", seed=21)
    bare = Emulator(
        **_emu_kwargs(
            make_emulator(n_pix=20, seed=22), pixel_error=None, history={}, meta={}
        )
    )
    dense_path = tmp_path / "mlp.npz"
    _write_dense_npz(dense_path)
    dense = Emulator.from_payne_npz(dense_path, wavelength=np.arange(1.0, 61.0))
    for i, emu in enumerate((deep, bare, dense)):
        path = tmp_path / f"emu{i}.h5"
        emu.save(path)
        _assert_same_emulator(emu, Emulator.load(path))


def test_payne5_round_trip(tmp_path, payne5):
    emu, d = payne5
    path = tmp_path / "payne5.h5"
    emu.save(path)
    back = Emulator.load(path)
    _assert_same_emulator(emu, back)
    x = _inside(np.random.default_rng(7), d["x_min"], d["x_max"], 8)
    np.testing.assert_array_equal(_predict(back, x, F32), _predict(emu, x, F32))


@pytest.fixture
def saved_emulator(tmp_path, tiny_emulator) -> Path:
    path = tmp_path / "emu.h5"
    tiny_emulator.save(path)
    return path


def _refuses(path: Path, extra: str = ""):
    return pytest.raises(
        payne_lite.FileFormatError,
        match=re.escape(str(path)) + (".*" + extra if extra else ""),
    )


def test_load_missing_file(tmp_path):
    path = tmp_path / "none.h5"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        Emulator.load(path)


def test_load_refuses_random_bytes(tmp_path):
    path = tmp_path / "noise.h5"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    with _refuses(path, "not a readable HDF5"):
        Emulator.load(path)


def test_load_refuses_corrupt_weights(saved_emulator):
    with h5py.File(saved_emulator, "r") as f:
        info = f["net/W0"].id.get_chunk_info(0)
    data = bytearray(saved_emulator.read_bytes())
    middle = int(info.byte_offset) + int(info.size) // 2
    for i in range(middle, middle + 8):
        data[i] ^= 0xFF
    saved_emulator.write_bytes(bytes(data))
    with _refuses(saved_emulator, "corrupt or truncated: its bytes do not match"):
        Emulator.load(saved_emulator)  # the file's checksum block sees it first
    restamp(saved_emulator)  # behind it, the datasets' Fletcher-32 sees it too
    with _refuses(saved_emulator, "dataset 'W0' is corrupt"):
        Emulator.load(saved_emulator)


def test_load_refuses_truncated(saved_emulator):
    data = saved_emulator.read_bytes()
    saved_emulator.write_bytes(data[: len(data) // 2])
    with _refuses(saved_emulator, "truncated"):
        Emulator.load(saved_emulator)


def test_load_refuses_grid_file(tmp_path, tiny_emulator):
    path = tmp_path / "grid.h5"
    rng = np.random.default_rng(0)
    SpectralGrid(
        wavelength=tiny_emulator.wavelength,
        labels=rng.normal(size=(4, 3)),
        flux=rng.normal(size=(4, 50)),
        label_names=tiny_emulator.label_names,
        label_units=tiny_emulator.label_units,
    ).save(path)
    with _refuses(path, "expected a 'payne_lite.Emulator' file"):
        Emulator.load(path)


@pytest.mark.parametrize("version", [0, 5, 99])
def test_load_refuses_other_format_version(saved_emulator, version):
    with h5py.File(saved_emulator, "r+") as f:
        f.attrs["format_version"] = version
    restamp(saved_emulator)
    with _refuses(saved_emulator, "format_version.*not supported"):
        Emulator.load(saved_emulator)


def test_load_refuses_wavelength_of_other_length(saved_emulator):
    with h5py.File(saved_emulator, "r+") as f:
        wave = f["wavelength"][()]
        del f["wavelength"]
        f["wavelength"] = wave[:-1]
    restamp(saved_emulator)
    with _refuses(saved_emulator, "inconsistent emulator file.*49"):
        Emulator.load(saved_emulator)


def test_load_refuses_inconsistent_names(saved_emulator):
    with h5py.File(saved_emulator, "r+") as f:
        f.attrs["label_names"] = '["Teff", "logg"]'
    restamp(saved_emulator)
    with _refuses(saved_emulator, "label_names"):
        Emulator.load(saved_emulator)


def test_load_refuses_missing_network(saved_emulator):
    with h5py.File(saved_emulator, "r+") as f:
        del f["net"]
    restamp(saved_emulator)
    with _refuses(saved_emulator, "missing group 'net'"):
        Emulator.load(saved_emulator)


# --- construction ---------------------------------------------------------------------
def _shrink_b0(emu: Emulator) -> PixelNet:
    return PixelNet(emu.net.weights, (emu.net.biases[0][:, :2], emu.net.biases[1]))


def _nan_weight(emu: Emulator) -> PixelNet:
    w1 = np.array(emu.net.weights[1], copy=True)
    w1[3, 1] = np.nan
    return PixelNet((emu.net.weights[0], w1), emu.net.biases)


BAD_EMULATORS = {
    "too_few_names": (
        dict(label_names=lambda e: e.label_names[:2]),
        r"label_names: 2 names",
    ),
    "too_many_names": (
        dict(label_names=lambda e: (*e.label_names, "vmacro")),
        r"label_names: 4 names",
    ),
    "duplicate_names": (
        dict(label_names=lambda e: ("Teff", "Teff", "logg")),
        r"names must be unique",
    ),
    "too_few_units": (dict(label_units=lambda e: ("K",)), r"label_units: 1 units"),
    "short_wavelength": (
        dict(wavelength=lambda e: e.wavelength[:-1]),
        r"W0 \(50, 3, 3\), b0 \(50, 3\) do not fit \(P=49, H, 3\)",
    ),
    "long_wavelength": (
        dict(wavelength=lambda e: np.r_[e.wavelength, 2e4]),
        r"do not fit \(P=51, H, 3\)",
    ),
    "non_increasing_wavelength": (
        dict(wavelength=lambda e: e.wavelength[::-1]),
        r"strictly increasing",
    ),
    "lo_equals_hi": (
        dict(label_hi=lambda e: np.r_[e.label_hi[:2], e.label_lo[2]]),
        r"label box is empty for label 2",
    ),
    "lo_above_hi": (
        dict(label_lo=lambda e: e.label_hi, label_hi=lambda e: e.label_lo),
        r"label box is empty for label 0",
    ),
    "box_wrong_length": (
        dict(label_lo=lambda e: e.label_lo[:2]),
        r"label box edges must both be \(3,\)",
    ),
    "nan_box": (
        dict(label_hi=lambda e: np.r_[np.nan, e.label_hi[1:]]),
        r"label box upper edge has 1 non-finite",
    ),
    "unknown_activation": (dict(activation=lambda e: "relu6"), r"activation 'relu6'"),
    "bias_shape": (dict(net=_shrink_b0), r"pixel net layer 0"),
    "nan_weight": (dict(net=_nan_weight), r"network array 1 has 1 non-finite"),
    "pixel_error_length": (
        dict(pixel_error=lambda e: e.pixel_error[:-1]),
        r"pixel_error \(49,\) must match wavelength \(50,\)",
    ),
}


@pytest.mark.parametrize("case", list(BAD_EMULATORS))
def test_construction_refuses(tiny_emulator, case):
    changes, message = BAD_EMULATORS[case]
    kw = _emu_kwargs(tiny_emulator, **{k: f(tiny_emulator) for k, f in changes.items()})
    with pytest.raises(ValueError, match=message):
        Emulator(**kw)


def test_construction_accepts_unchanged_kwargs(tiny_emulator):
    _assert_same_emulator(tiny_emulator, Emulator(**_emu_kwargs(tiny_emulator)))


def test_dense_construction_refuses_wrong_output_width(tmp_path):
    path = tmp_path / "mlp.npz"
    _write_dense_npz(path, n_pix=60)
    with pytest.raises(
        ValueError, match="dense net outputs 60 pixels, wavelength has 59"
    ):
        Emulator.from_payne_npz(path, wavelength=np.arange(1.0, 60.0))


# --- regressions of bugs found in review ------------------------------------------
def test_replace_uses_new_weights(make_emulator):
    old, new = make_emulator(seed=1), make_emulator(seed=2)
    x = 0.5 * (old.label_lo + old.label_hi)
    _predict(old, x, F32)  # fills old's device cache
    swapped = dataclasses.replace(old, net=new.net)
    np.testing.assert_array_equal(_predict(swapped, x, F32), _predict(new, x, F32))


def test_emulator_owns_its_weights(make_emulator):
    emu = make_emulator(seed=3)
    weights = [np.array(w, copy=True) for w in emu.net.weights]
    biases = [np.array(b, copy=True) for b in emu.net.biases]
    mine = Emulator(**_emu_kwargs(emu, net=PixelNet(tuple(weights), tuple(biases))))
    x = 0.5 * (emu.label_lo + emu.label_hi)
    biases[-1][...] += 1.0  # the caller reuses its buffer
    np.testing.assert_array_equal(_predict(mine, x, F32), _predict(emu, x, F32))


def test_float64_request_without_x64_does_not_poison_cache(make_emulator, tol):
    emu = make_emulator(seed=4)
    x = 0.5 * (emu.label_lo + emu.label_hi)
    with jax.enable_x64(False), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # today JAX warns "float64 ... not available"
        with contextlib.suppress(ValueError):  # a fix may refuse the request instead
            emu.predict(x, dtype=np.float64)
    flux = _predict(emu, x, F64)
    assert flux.dtype == F64
    ref = ref_emulator(emu, x)[0]
    _assert_close(flux, ref, tol(F64), scale=np.abs(ref).max())


def test_with_error_basis_holds_the_held_out_covariance(tmp_path):
    """Emulator.with_error_basis on held-out spectra of another network: with the
    full rank, B^T B is the errors' second moment R^T R / N (NumPy), and a lower
    rank keeps its leading eigenvalues; pixel_error is their RMS; an unusable
    pixel counts as zero error; error_scale is dropped; the basis survives a
    save/load; another grid or a rank out of range is refused."""
    from conftest import TINY_NAMES, TINY_UNITS, build_tiny_emulator

    emu = build_tiny_emulator(n_pix=40, seed=2)
    truth = build_tiny_emulator(n_pix=40, seed=3)
    rng = np.random.default_rng(0)
    labels = emu.unscale(rng.uniform(-0.4, 0.4, (30, 3)))
    flux = truth.predict(labels).astype(np.float64)
    err = np.full_like(flux, 0.01)
    err[4, 7] = np.inf  # unusable: counts as no error
    grid = SpectralGrid(wavelength=emu.wavelength, labels=labels, flux=flux,
                        label_names=TINY_NAMES, label_units=TINY_UNITS,
                        flux_err=err)  # fmt: skip
    r = emu.predict(labels).astype(np.float64) - flux
    r[4, 7] = 0.0
    full = emu.with_error_basis(grid, rank=29)
    b = full.error_basis.astype(np.float64)
    np.testing.assert_allclose(b.T @ b, r.T @ r / 30, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(full.pixel_error, np.sqrt(np.mean(r * r, 0)), rtol=1e-5)
    low = emu.with_error_basis(grid, rank=3)
    ev = np.linalg.eigvalsh(r.T @ r / 30)[::-1][:3]
    b3 = low.error_basis.astype(np.float64)
    np.testing.assert_allclose(np.linalg.eigvalsh(b3 @ b3.T)[::-1], ev, rtol=1e-4)
    assert low.error_scale is None and low.meta["error_basis"]["rank"] == 3
    low.save(tmp_path / "e.h5")
    back = Emulator.load(tmp_path / "e.h5")
    np.testing.assert_array_equal(back.error_basis, low.error_basis)
    with pytest.raises(ValueError, match="rank must be"):
        emu.with_error_basis(grid, rank=30)
    other = dataclasses.replace(grid, wavelength=grid.wavelength + 1.0)
    with pytest.raises(ValueError, match="wavelengths"):
        emu.with_error_basis(other)


def test_with_local_error_keeps_the_held_out_errors(tmp_path):
    """Emulator.with_local_error stores predict - flux of the held-out spectra (an
    unusable pixel as no error) with their scaled labels, each error's Doppler
    shift apart from the rest of it; the file is format
    version 4 with it (3 or 2 without), and the model survives a save/load; the
    rest of the emulator is unchanged; another grid or too many neighbours is
    refused, as is a model of another shape."""
    import h5py
    from conftest import TINY_NAMES, TINY_UNITS, build_tiny_emulator, restamp

    from payne_lite.emulator import LocalError, rv_derivative

    emu = build_tiny_emulator(n_pix=40, seed=2)
    truth = build_tiny_emulator(n_pix=40, seed=3)
    rng = np.random.default_rng(1)
    labels = emu.unscale(rng.uniform(-0.5, 0.5, (25, 3)))
    flux = truth.predict(labels).astype(np.float64)
    err = np.full_like(flux, 0.01)
    err[2, 5] = 0.0
    grid = SpectralGrid(wavelength=emu.wavelength, labels=labels, flux=flux,
                        label_names=TINY_NAMES, label_units=TINY_UNITS,
                        flux_err=err)  # fmt: skip
    loc = emu.with_local_error(grid, neighbours=5)
    pred = emu.predict(labels).astype(np.float64)
    r = pred - flux
    r[2, 5] = 0.0
    # kept apart: each error's Doppler shift (along its own spectrum's rv
    # derivative) and the rest of it, orthogonal to that derivative
    d = rv_derivative(emu.wavelength, pred)
    dv = -np.sum(d * r, axis=1) / np.sum(d * d, axis=1)
    np.testing.assert_allclose(loc.local_error.shifts, dv, rtol=1e-6)
    want = r + dv[:, None] * d
    np.testing.assert_allclose(loc.local_error.errors, want, rtol=1e-5, atol=1e-8)
    rest = np.asarray(loc.local_error.errors, np.float64)
    assert np.all(
        np.abs(np.sum(d * rest, 1))
        < 1e-4 * np.sqrt(np.sum(d * d, 1) * np.sum(r * r, 1))
    )
    np.testing.assert_allclose(loc.local_error.scaled, emu.scale(labels))
    assert (
        loc.local_error.neighbours == 5 and loc.meta["local_error"]["n_held_out"] == 25
    )
    np.testing.assert_array_equal(loc.pixel_error, emu.pixel_error)
    # the device rows a GLS fit gathers from: cached, LocalError.stacked's
    rows = loc.local_error_rows(np.float32)
    assert rows is loc.local_error_rows(np.float32) and emu.local_error_rows() is None
    want = loc.local_error.stacked(loc.error_basis).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(rows), want)
    loc.save(tmp_path / "l.h5")
    emu.save(tmp_path / "e.h5")
    with h5py.File(tmp_path / "l.h5") as f, h5py.File(tmp_path / "e.h5") as g:
        assert f.attrs["format_version"] == 4
        assert g.attrs["format_version"] in (2, 3) and "local_error" not in g
    back = Emulator.load(tmp_path / "l.h5")
    np.testing.assert_array_equal(back.local_error.errors, loc.local_error.errors)
    np.testing.assert_array_equal(back.local_error.scaled, loc.local_error.scaled)
    assert back.local_error.neighbours == 5 and back.local_error.shrink == 0.15
    np.testing.assert_array_equal(back.local_error.shifts, loc.local_error.shifts)
    assert loc.local_error.shifts.shape == (25,)
    assert Emulator.load(tmp_path / "e.h5").local_error is None
    with h5py.File(tmp_path / "l.h5", "r+") as f:  # one label row too few
        data = f["local_error/scaled"][:-1]
        del f["local_error/scaled"]
        f["local_error/scaled"] = data
    with pytest.raises(payne_lite.FileFormatError, match="checksum"):
        Emulator.load(tmp_path / "l.h5")
    restamp(tmp_path / "l.h5")  # past the checksum: the contents are checked too
    with pytest.raises(payne_lite.FileFormatError, match="inconsistent local error"):
        Emulator.load(tmp_path / "l.h5")
    with pytest.raises(ValueError, match="neighbours must be 2 .. 25"):
        emu.with_local_error(grid, neighbours=26)
    other = dataclasses.replace(grid, wavelength=grid.wavelength + 1.0)
    with pytest.raises(ValueError, match="wavelengths"):
        emu.with_local_error(other)
    wrong = LocalError(np.zeros((4, 39)), np.zeros((4, 3)), 2)
    with pytest.raises(ValueError, match="local_error has 39 pixels"):
        dataclasses.replace(emu, local_error=wrong)
