"""Shared fixtures for the payne_lite test suite.

* ``payne_data``: the real Payne/APOGEE example data that ships in ``data/``
  (``payne_lite.datasets.payne_apogee()``); ``payne_apogee``: its 5-label network and
  mask.
* ``make_emulator`` / ``tiny_emulator``: small random per-pixel emulators built in
  memory (no data files), seeded with ``np.random.default_rng``.
* ``tol``: dtype-keyed tolerances (float32 vs float64).
* JAX's persistent compilation cache is the test run's own: a fresh temporary
  directory (``PAYNE_LITE_COMPILATION_CACHE``), shared by the run's xdist workers and
  the subprocesses they start, removed at the end; a run started with that variable
  set (``off``, or a directory) keeps it.

Precision is never switched globally here: float64 checks use ``jax.enable_x64(True)``
as a context manager inside the test.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
import pytest

# Each run compiles for itself (no cache shared between runs, so that compile
# counts and timings mean the same every run), but once: many tests and their
# subprocesses compile the same fitter programs (the same emulator, the same chunk
# shapes), which a cache of the run's own loads instead (the suite's compile time
# is most of its time: ~14 % less in all, measured on two loaded runs). The
# controller imports this file first, before it starts the xdist workers, which
# inherit the variable; tests/test_compile.py sets its own caches in subprocesses.
_RUN_CACHE = None
if "PAYNE_LITE_COMPILATION_CACHE" not in os.environ:
    _RUN_CACHE = tempfile.mkdtemp(prefix="payne-lite-tests-jax-")
    os.environ["PAYNE_LITE_COMPILATION_CACHE"] = _RUN_CACHE


def pytest_unconfigure(config):
    if _RUN_CACHE is not None:
        shutil.rmtree(_RUN_CACHE, ignore_errors=True)


from payne_lite import Emulator, PixelNet, datasets  # noqa: E402
from payne_lite._serial import guard_memory_maps  # noqa: E402
from payne_lite.observe import DOPPLER_INTERP  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_executables_between_modules():
    """An xdist worker runs hundreds of tests in one process, each compiling for its
    own emulators and options, and every executable holds memory mappings: past
    ``vm.max_map_count`` LLVM aborts the worker mid-compilation (five of seven full
    runs with Lanczos-6 as the default). Between modules, above a quarter of the
    limit, the compiled executables are forgotten, so that the library's own guard
    (half the limit, :func:`payne_lite._serial.guard_memory_maps`) would fire inside a
    test (where a counted compilation could see it) only if one module mapped a
    quarter of the limit (~16,000 mappings: about ten first fits of new
    configurations; the largest module boundary seen was ~21,000 in all)."""
    yield
    guard_memory_maps(0.25)


#: The smooth Doppler interpolant that is not the default (of Lanczos-6 and Keys'
#: six-tap cubic): tests of ``Instrument(doppler=...)`` use it.
OTHER_DOPPLER = "cubic6" if DOPPLER_INTERP == "lanczos6" else "lanczos6"

#: Relative tolerances (times the magnitude of the reference) by computation dtype.
_TOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}

TINY_NAMES = ("Teff", "logg", "[Fe/H]")
TINY_UNITS = ("K", "dex", "dex")
TINY_LO = np.array([4000.0, 1.0, -2.0])
TINY_HI = np.array([7000.0, 5.0, 0.5])


def tolerance(dtype) -> float:
    """Tolerance of a result computed in ``dtype``, relative to its magnitude."""
    return _TOL[np.dtype(dtype)]


@pytest.fixture(scope="session")
def tol() -> Callable[[object], float]:
    """``tol(dtype)``: 1e-5 for float32, 1e-10 for float64 (relative to magnitude)."""
    return tolerance


@pytest.fixture(scope="session")
def payne_data() -> datasets.PayneApogee:
    """The real Payne/APOGEE example data that ships with the package (paths and
    loaders; a FileNotFoundError naming where it looked if the checkout lacks it)."""
    return datasets.payne_apogee()


#: Label names and units of The Payne's 5-label APOGEE network (its README).
PAYNE_LABELS_5 = datasets.PAYNE_LABELS_5
PAYNE_UNITS_5 = datasets.PAYNE_UNITS_5


@pytest.fixture(scope="session")
def payne_apogee(payne_data) -> tuple[Emulator, np.ndarray]:
    """The real 5-label Payne network on the APOGEE grid, and the APOGEE mask (P,)."""
    return payne_data.emulator(), payne_data.mask


def lanczos_shift(rest, u, a: int = 8):
    """``rest`` (P,), samples on a uniform grid, read at positions ``j - u`` (j = 0
    .. P - 1) by a Lanczos-``a`` windowed sinc (2a taps): a band-limited shift by
    ``u`` pixels, written out in NumPy; NaN where a tap leaves the grid."""
    x = np.arange(rest.size) - u
    i0 = np.floor(x).astype(int)
    out = np.zeros(rest.size)
    for m in range(-a + 1, a + 1):
        i = i0 + m
        d = x - i
        inside = (i >= 0) & (i < rest.size)
        val = rest[np.clip(i, 0, rest.size - 1)]
        out += np.where(inside, val * np.sinc(d) * np.sinc(d / a), np.nan)
    return out


def keys_kernel(x, taps: int = 6):
    """Keys' cubic convolution kernels (Keys 1981, IEEE TASSP 29, 1153), by their
    piecewise formulas: the four-tap one (a = -1/2) and the six-tap one (exact for
    cubics)."""
    ax = np.abs(np.asarray(x, np.float64))
    if taps == 4:
        return np.where(
            ax <= 1.0,
            1.5 * ax**3 - 2.5 * ax**2 + 1.0,
            np.where(ax < 2.0, -0.5 * ax**3 + 2.5 * ax**2 - 4.0 * ax + 2.0, 0.0),
        )
    return np.where(
        ax <= 1.0,
        4 / 3 * ax**3 - 7 / 3 * ax**2 + 1.0,
        np.where(
            ax <= 2.0,
            -7 / 12 * ax**3 + 3 * ax**2 - 59 / 12 * ax + 15 / 6,
            np.where(ax < 3.0, ax**3 / 12 - 2 / 3 * ax**2 + 7 / 4 * ax - 1.5, 0.0),
        ),
    )


def lanczos_kernel(x, a: int = 6):
    """The Lanczos kernel ``sinc(x) sinc(x / a)`` (0 beyond ``a``), unnormalised."""
    x = np.asarray(x, np.float64)
    return np.where(np.abs(x) < a, np.sinc(x) * np.sinc(x / a), 0.0)


def doppler_interp(xq, x, y, kind: str = DOPPLER_INTERP):
    """NumPy reference of the fitter's Doppler interpolant ``kind`` (default: the
    fitter's default), on the pixel index of the grid ``x`` as
    :func:`cubic_interp`: Keys' kernels for ``"cubic"`` and ``"cubic6"``; for
    ``"lanczos6"`` the twelve pixels ``i - 5 .. i + 6`` around the interval ``i``
    weighted by :func:`lanczos_kernel`, the weights divided by their sum."""
    if kind == "cubic":
        return cubic_interp(xq, x, y, taps=4)
    if kind == "cubic6":
        return cubic_interp(xq, x, y, taps=6)
    assert kind == "lanczos6", kind
    return cubic_interp(xq, x, y, taps=12, kernel=lanczos_kernel)


def cubic_interp(xq, x, y, taps: int = 6, kernel=None):
    """NumPy reference of Keys' cubic convolution (the fitter's interpolant before
    Lanczos-6) on the pixel index of the grid ``x`` (the fractional index linear in
    ``x`` within its interval), the sum over the ``taps`` nearest pixels j of
    ``keys_kernel(u - j) y_j`` (or of ``kernel(u - j) y_j`` over their sum);
    NaN where a tap leaves the grid, except on a grid point, where the value is that
    point's (``y`` (..., P))."""
    x = np.asarray(x, np.float64)
    xq = np.asarray(xq, np.float64)
    y = np.asarray(y, np.float64)
    n = x.size
    i = np.clip(np.searchsorted(x, xq, side="right") - 1, 0, n - 2)
    u = i + (xq - x[i]) / (x[i + 1] - x[i])
    out = np.zeros(y.shape[:-1] + xq.shape)
    total = np.zeros(xq.shape)
    lo, hi = -(taps // 2 - 1), taps // 2
    for j in range(lo, hi + 1):
        idx = np.clip(i + j, 0, n - 1)
        k = keys_kernel(u - (i + j), taps) if kernel is None else kernel(u - (i + j))
        out = out + k * y[..., idx]
        total = total + k
    if kernel is not None:  # (total 0: off the grid, NaN below)
        out = out / np.where(total != 0, total, 1.0)
    at = np.where(xq == x[i + 1], i + 1, i)
    node = xq == x[at]  # on a rest pixel: its value, whatever the taps around
    out = np.where(node, y[..., at], out)
    bad = ((i + lo < 0) | (i + hi > n - 1)) & ~node | (xq < x[0]) | (xq > x[-1])
    return np.where(bad, np.nan, out)


def build_tiny_emulator(
    n_pix: int = 50,
    n_hid: int | tuple[int, ...] = 3,
    n_lab: int = 3,
    *,
    seed: int = 0,
    activation: str = "sigmoid",
) -> Emulator:
    """A random per-pixel emulator, ``n_hid`` hidden units (or a tuple of layers)."""
    if n_lab > len(TINY_NAMES):
        raise ValueError(f"at most {len(TINY_NAMES)} labels, got {n_lab}")
    rng = np.random.default_rng(seed)
    hidden = (n_hid,) if isinstance(n_hid, int) else tuple(n_hid)
    weights, biases, width = [], [], n_lab
    for h in hidden:
        weights.append(rng.normal(0.0, 1.0, (n_pix, h, width)))
        biases.append(rng.normal(0.0, 0.5, (n_pix, h)))
        width = h
    weights.append(rng.normal(0.0, 0.3, (n_pix, width)))
    biases.append(1.0 + rng.normal(0.0, 0.05, n_pix))
    return Emulator(
        net=PixelNet(tuple(weights), tuple(biases)),
        activation=activation,
        label_names=TINY_NAMES[:n_lab],
        label_units=TINY_UNITS[:n_lab],
        label_lo=TINY_LO[:n_lab],
        label_hi=TINY_HI[:n_lab],
        wavelength=np.linspace(15100.0, 15100.0 + 0.2 * (n_pix - 1), n_pix),
        pixel_error=rng.uniform(1e-4, 1e-2, n_pix),
        history={
            "train_loss": np.geomspace(1.0, 1e-3, 7),
            "valid_loss": np.geomspace(2.0, 2e-3, 7),
        },
        meta={"source": "tests/conftest.py", "seed": seed, "hidden": list(hidden)},
    )


def build_log_emulator(n_pix: int = 120, *, seed: int = 4) -> Emulator:
    """:func:`build_tiny_emulator`'s network on a log-uniform grid (15100-15180 A;
    the broadening kernels need one), without a pixel error."""
    base = build_tiny_emulator(n_pix=n_pix, seed=seed)
    return Emulator(
        net=base.net,
        activation=base.activation,
        label_names=base.label_names,
        label_units=base.label_units,
        label_lo=base.label_lo,
        label_hi=base.label_hi,
        wavelength=np.exp(np.linspace(np.log(15100.0), np.log(15180.0), n_pix)),
        meta={"source": "tests/conftest.py", "seed": seed},
    )


def write_tiny_catalog(path, emu, n: int, *, seed: int = 1, noise: float = 0.02):
    """A catalog file of ``n`` noisy spectra of ``emu`` (labels uniform in the middle
    60 % of its box, flux errors ``noise``, ids ``s0``, ``s1`` ...); returns the path."""
    import payne_lite as pl

    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(0.2, 0.8, (n, emu.n_labels))
    flux = emu.predict(labels) + rng.normal(0, noise, (n, emu.wavelength.size))
    ids = [f"s{i}" for i in range(n)]
    return pl.write_catalog(
        path, flux, np.full_like(flux, noise), emu.wavelength, ids=ids
    )


def restamp(path) -> None:
    """Stamp an HDF5 file again (:func:`payne_lite._h5.stamp`) after a test edited it
    in place, as a file written that way (another version, another content) would be;
    files without a stamp (catalogs) are left as they are."""
    from payne_lite import _h5

    if _h5.looks_stamped(path):
        with open(path, "r+b") as fh:
            _h5.stamp(fh)


def redigest_catalog(path) -> None:
    """Write a version-3 catalog's string checksums (``strings_sha256``) again after a
    test edited its ``ids`` or ``group`` in place, as a file written with those
    values would have them."""
    import json

    import h5py

    from payne_lite.catalog._hdf5 import STRINGS_DIGEST_ATTR, StringsDigest

    with h5py.File(path, "a") as f:
        digests = {}
        for name in ("ids", "group"):
            if name in f:
                d = StringsDigest()
                d.update(f[name][()])
                digests[name] = d.hexdigest()
        f.attrs[STRINGS_DIGEST_ATTR] = json.dumps(digests)


def interrupt_chunk(monkeypatch, n: int, record) -> None:
    """Make fit_catalog's ``n``-th chunk fit raise KeyboardInterrupt (as a Ctrl-C
    would); ``record(chunk)`` is called for every chunk. Undo with
    ``monkeypatch.undo()``."""
    from payne_lite.catalog import _runner

    fit_rows, calls = _runner.fit_rows, []

    def dies(chunk, *args, **kwargs):
        calls.append(chunk)
        record(chunk)
        if len(calls) == n:
            raise KeyboardInterrupt
        return fit_rows(chunk, *args, **kwargs)

    monkeypatch.setattr(_runner, "fit_rows", dies)


@pytest.fixture(scope="session")
def make_emulator() -> Callable[..., Emulator]:
    """Factory with the signature of :func:`build_tiny_emulator`."""
    return build_tiny_emulator


@pytest.fixture
def tiny_emulator() -> Emulator:
    """50 pixels, 3 sigmoid hidden units, 3 labels (Teff, logg, [Fe/H]); seed 0."""
    return build_tiny_emulator()
