"""The spectrum emulator: per-pixel neural networks evaluated for all pixels at once.

The numerical core is a set of pure functions on pytrees (:class:`PixelNet`,
:class:`DenseNet`); :class:`Emulator` wraps one of them with what a user needs to use it
safely: label names, units, the training box, the wavelength grid, the per-pixel
emulator error, and a versioned HDF5 file format.

Labels enter the networks scaled to the training box, ``s = (x - lo) / (hi - lo) - 0.5``,
so the box maps to ``[-0.5, 0.5]`` as in The Payne (Ting et al. 2019, ApJ 879, 69).

The file format (:meth:`Emulator.save`, :meth:`Emulator.load`) is
:mod:`payne_lite.emulator._file`'s.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from .. import _h5
from .._validate import (
    as_float_array,
    check_box,
    check_finite,
    check_names,
    check_wavelength,
)
from ..errors import FileFormatError
from . import _outpool
from ._file import read_emulator_fields, write_emulator
from ._local_error import (
    LOCAL_NEIGHBOURS,
    LOCAL_SHRINK,
    LocalError,
    rv_derivative,
    shifts_along,
)
from ._nets import (
    ACTIVATIONS,
    DenseNet,
    KernelNet,
    PixelNet,
    kernel_layout,
    predict_chunk,
    scale_labels,
    unscale_labels,
)
from ._report import ValidationReport
from ._train_ckpt import grid_digest

#: The label-space scale of the emulator's error (:meth:`Emulator.error_scale_at`)
#: is clipped to this range, and the scaled labels to the box before it is
#: evaluated (its quadratic is fitted inside the box).
ERROR_SCALE_RANGE = (0.25, 10.0)


def error_scale_features(scaled) -> np.ndarray:
    """(n, F) features of :attr:`Emulator.error_scale`: 1, the scaled labels (n, L)
    and their products (``F = 1 + L + L (L + 1) / 2``), the labels clipped to the
    box [-0.5, 0.5] first."""
    s = np.clip(np.atleast_2d(np.asarray(scaled, np.float64)), -0.5, 0.5)
    n_lab = s.shape[1]
    cols = [np.ones(len(s))] + [s[:, j] for j in range(n_lab)]
    cols += [s[:, i] * s[:, j] for i in range(n_lab) for j in range(i, n_lab)]
    return np.column_stack(cols)


Array = jax.Array


# --------------------------------------------------------------------------------------
# The user-facing object
# --------------------------------------------------------------------------------------
def error_basis_of(resid, rank: int) -> np.ndarray:
    """(K, P) float32: the ``rank`` leading principal components of the errors
    ``resid`` (N, P) (0 at unused pixels), scaled by singular value / sqrt(N), so
    that ``B^T B`` is their covariance truncated to rank K = min(rank, N, P)."""
    r = np.asarray(resid, np.float64)
    _, sv, vt = np.linalg.svd(r, full_matrices=False)
    k = min(int(rank), sv.size)
    return (sv[:k, None] * vt[:k] / np.sqrt(r.shape[0])).astype(np.float32)


def _check_net(net, kind: str, n_pix: int, n_lab: int) -> None:
    """Raise ValueError unless the weight shapes form a valid ``kind`` network."""
    ws = [np.shape(w) for w in net.weights]
    bs = [np.shape(b) for b in net.biases]
    if len(ws) != len(bs) or len(ws) < 2:
        raise ValueError(
            f"network needs >= 2 layers of weights and biases, got "
            f"{len(ws)} weights and {len(bs)} biases"
        )
    if kind == "pixel":
        width = n_lab
        for i, (w, b) in enumerate(zip(ws[:-1], bs[:-1], strict=True)):
            if len(w) != 3 or w[0] != n_pix or w[2] != width or b != (n_pix, w[1]):
                raise ValueError(
                    f"pixel net layer {i}: W{i} {w}, b{i} {b} do not fit "
                    f"(P={n_pix}, H, {width})"
                )
            width = w[1]
        if ws[-1] != (n_pix, width) or bs[-1] != (n_pix,):
            raise ValueError(
                f"pixel net output layer: W {ws[-1]}, b {bs[-1]}; expected "
                f"({n_pix}, {width}) and ({n_pix},)"
            )
    elif kind == "dense":
        width = n_lab
        for i, (w, b) in enumerate(zip(ws, bs, strict=True)):
            if len(w) != 2 or w[1] != width or b != (w[0],):
                raise ValueError(
                    f"dense net layer {i}: W{i} {w}, b{i} {b} do not fit "
                    f"input width {width}"
                )
            width = w[0]
        if width != n_pix:
            raise ValueError(
                f"dense net outputs {width} pixels, wavelength has {n_pix}"
            )
    else:
        raise ValueError(f"unknown network kind {kind!r}; expected 'pixel' or 'dense'")


def _check_report(report, names: tuple[str, ...], n_pix: int) -> None:
    """Raise ValueError unless ``report`` is a ValidationReport of these labels and
    pixels."""
    if not isinstance(report, ValidationReport):
        raise ValueError(
            f"report must be a ValidationReport, got {type(report).__name__}"
        )
    if report.label_names != names:
        raise ValueError(
            f"report labels {list(report.label_names)} differ from {list(names)}"
        )
    if report.pixel_median.size != n_pix:
        raise ValueError(
            f"report has {report.pixel_median.size} pixels, the network {n_pix}"
        )


#: Spectra per jitted call of :meth:`Emulator.predict` (its default ``batch_size``).
PREDICT_CHUNK = 256


def _copy_rows(out: np.ndarray, start: int, res) -> None:
    """Copy the rows of one chunk's result ``res`` that ``out[start:]`` holds."""
    m = min(out.shape[0] - start, res.shape[0])
    out[start : start + m] = np.asarray(res)[:m]


@dataclasses.dataclass(frozen=True, eq=False)
class Emulator:
    """A trained spectrum emulator with everything needed to use it safely.

    Attributes:
        net: the weights, a :class:`PixelNet` or :class:`DenseNet` of NumPy arrays.
        activation: name in :data:`ACTIVATIONS`.
        label_names: L names, in the order the network expects them.
        label_units: L units.
        label_lo, label_hi: (L,) the training box [physical units]; it maps to
            [-0.5, 0.5] in the scaled labels.
        wavelength: (P,) vacuum wavelength [Angstrom] of the predicted pixels.
        pixel_error: optional (P,) RMS emulator error per pixel on held-out spectra
            [flux units]; the fitter can add it in quadrature to observed errors.
        history: loss curves from training, name -> (n_iter,) array.
        meta: provenance (training settings, source file).
        error_basis: optional (K, P) [flux units]: the emulator's errors on
            held-out spectra as a low-rank covariance, ``C ~ error_basis.T @
            error_basis`` (their K leading principal components over the held-out
            spectra, each scaled by singular value / sqrt(n_valid)). The errors are
            correlated across pixels (they shift labels coherently); the fitter
            uses this for the label errors (see :func:`payne_lite.fit`).
        error_scale: optional (L + 1, F) float64: how the emulator's error, seen
            in the labels (and rv) that a fit of it returns, varies over the box:
            ``log kappa^2`` per label and rv as a quadratic in the scaled labels
            (:func:`error_scale_features`), ``kappa`` the factor by which the
            fitter's emulator term of each label's error (the sandwich with
            ``error_basis``) must grow at those labels. Fitted on held-out spectra
            by :func:`payne_lite.calibrate_emulator_errors`; None: 1 everywhere.
        report: optional :class:`ValidationReport`: the held-out errors across the
            label box and the provenance of training (written by
            :func:`payne_lite.train_emulator`; None for imported networks and files
            older than format version 2). :meth:`validate` makes one on any grid.
        local_error: optional :class:`LocalError`: held-out errors with their
            labels, the error covariance near any labels (the mean outer product
            of the nearest held-out errors). Generalised least squares
            (``LMOptions(estimator="gls")``) and the samplers use it, when present,
            instead of ``error_basis`` and ``pixel_error``; made by
            :meth:`with_local_error`.

    Examples:
        >>> flux = emu.predict([5000.0, 4.5, 0.0, 0.1, 5.0])      # doctest: +SKIP
    """

    net: PixelNet | DenseNet
    activation: str
    label_names: tuple[str, ...]
    label_units: tuple[str, ...]
    label_lo: np.ndarray
    label_hi: np.ndarray
    wavelength: np.ndarray
    pixel_error: np.ndarray | None = None
    history: dict = dataclasses.field(default_factory=dict)
    meta: dict = dataclasses.field(default_factory=dict)
    error_basis: np.ndarray | None = None
    report: ValidationReport | None = None
    error_scale: np.ndarray | None = None
    local_error: LocalError | None = None
    _device_cache: dict = dataclasses.field(
        default_factory=dict, init=False, repr=False
    )

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        wave = as_float_array(self.wavelength, "wavelength", ndim=1)
        check_wavelength(wave)
        kind = "dense" if isinstance(self.net, DenseNet) else "pixel"
        net_np = type(self.net)(
            tuple(np.array(w, copy=True) for w in self.net.weights),
            tuple(np.array(b, copy=True) for b in self.net.biases),
        )
        for a in net_np.weights + net_np.biases:
            a.setflags(write=False)
        n_lab = np.shape(net_np.weights[0])[-1]
        _check_net(net_np, kind, wave.size, n_lab)
        for i, a in enumerate(net_np.weights + net_np.biases):
            check_finite(a, f"network array {i}")
        names = check_names(self.label_names, n_lab, "label_names")
        units = tuple(str(u) for u in self.label_units)
        if len(units) != n_lab:
            raise ValueError(f"label_units: {len(units)} units for {n_lab} labels")
        lo, hi = check_box(self.label_lo, self.label_hi, n_lab)
        perr = None
        if self.pixel_error is not None:
            perr = as_float_array(
                self.pixel_error, "pixel_error", ndim=1, dtype=np.float32
            )
            if perr.shape != wave.shape:
                raise ValueError(
                    f"pixel_error {perr.shape} must match wavelength {wave.shape}"
                )
        basis = None
        if self.error_basis is not None:
            basis = as_float_array(
                self.error_basis, "error_basis", ndim=2, dtype=np.float32
            )
            if basis.shape[1] != wave.size:
                raise ValueError(
                    f"error_basis {basis.shape} must be (K, {wave.size}): one column "
                    "per wavelength pixel"
                )
            check_finite(basis, "error_basis")
        if self.report is not None:
            _check_report(self.report, names, wave.size)
        scale = None
        if self.error_scale is not None:
            scale = as_float_array(self.error_scale, "error_scale", ndim=2)
            n_feat = error_scale_features(np.zeros((1, n_lab))).shape[1]
            if scale.shape != (n_lab + 1, n_feat):
                raise ValueError(
                    f"error_scale {scale.shape} must be ({n_lab + 1}, {n_feat}): one "
                    "row per label and rv, one column per error_scale_features column"
                )
            check_finite(scale, "error_scale")
            if basis is None:
                raise ValueError(
                    "error_scale scales the error_basis: it needs one (to drop "
                    "both: dataclasses.replace(emu, error_basis=None, "
                    "error_scale=None))"
                )
        if self.local_error is not None:
            if not isinstance(self.local_error, LocalError):
                raise TypeError(
                    f"local_error must be a LocalError, got {type(self.local_error)}"
                )
            shape = self.local_error.errors.shape[1], self.local_error.scaled.shape[1]
            if shape != (wave.size, n_lab):
                raise ValueError(
                    f"local_error has {shape[0]} pixels and {shape[1]} labels, the "
                    f"emulator {wave.size} and {n_lab}"
                )
        for name, val in [
            ("error_scale", scale),
            ("error_basis", basis),
            ("net", net_np),
            ("label_names", names),
            ("label_units", units),
            ("label_lo", lo),
            ("label_hi", hi),
            ("wavelength", wave),
            ("pixel_error", perr),
            ("history", {k: np.asarray(v) for k, v in self.history.items()}),
            ("meta", dict(self.meta)),
        ]:
            object.__setattr__(self, name, val)
        for a in (lo, hi, wave, perr, scale):
            if a is not None:
                a.setflags(write=False)

    # -- shape conveniences ---------------------------------------------------------
    @property
    def kind(self) -> str:
        """``"pixel"`` (one network per pixel) or ``"dense"`` (one network)."""
        return "dense" if isinstance(self.net, DenseNet) else "pixel"

    @property
    def n_pix(self) -> int:
        return self.wavelength.size

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    def error_scale_at(self, scaled) -> np.ndarray:
        """(n, L + 1) the factor ``kappa`` on the emulator's part of each label's
        and rv's error at the scaled labels ``scaled`` (n, L) (see
        :attr:`error_scale`; clipped to :data:`ERROR_SCALE_RANGE`; NaN for NaN
        labels); ones without an ``error_scale``."""
        s = np.atleast_2d(np.asarray(scaled, np.float64))
        if self.error_scale is None:
            return np.ones((s.shape[0], self.n_labels + 1))
        with np.errstate(over="ignore", invalid="ignore"):
            kappa = np.sqrt(np.exp(error_scale_features(s) @ self.error_scale.T))
        # overflow: the largest; NaN labels stay NaN (np.clip keeps NaN)
        kappa = np.where(np.isposinf(kappa), ERROR_SCALE_RANGE[1], kappa)
        return np.clip(kappa, *ERROR_SCALE_RANGE)

    @property
    def hidden(self) -> tuple[int, ...]:
        """Widths of the hidden layers."""
        if self.kind == "pixel":
            return tuple(int(np.shape(w)[1]) for w in self.net.weights[:-1])
        return tuple(int(np.shape(w)[0]) for w in self.net.weights[:-1])

    @property
    def resolution(self) -> float | None:
        """Resolving power R = lambda / FWHM of the emulated spectra, or None if unknown.

        ``meta["resolution"]`` when set (set it for imported networks, e.g. 22,500
        for The Payne's APOGEE networks), else the training grid's
        (``meta["grid_meta"]["resolution"]``: the built-in synthesizer records the R
        it convolved with). The fitter assumes
        :data:`payne_lite.observe._model.DEFAULT_EMULATOR_RESOLUTION` (APOGEE's 22,500) when
        this is None and a lower instrumental resolution is requested.
        """
        for meta in (self.meta, self.meta.get("grid_meta") or {}):
            r = meta.get("resolution") if isinstance(meta, dict) else None
            if isinstance(r, int | float) and np.isfinite(r) and r > 0:
                return float(r)
        return None

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi): the training box in physical units, each (L,)."""
        return self.label_lo, self.label_hi

    def __repr__(self) -> str:
        box = ", ".join(
            f"{n} [{a:g}, {b:g}]"
            for n, a, b in zip(
                self.label_names, self.label_lo, self.label_hi, strict=True
            )
        )
        return (
            f"Emulator({self.kind}, hidden={self.hidden}, {self.activation}, "
            f"n_pix={self.n_pix}, labels: {box})"
        )

    # -- evaluation -----------------------------------------------------------------
    def params(self, dtype=None):
        """The network as a pytree of JAX arrays of ``dtype`` (default: JAX's float).

        Cached per dtype, so repeated calls do not copy the weights to the device again.
        """
        dtype = jax.dtypes.canonicalize_dtype(dtype or jnp.result_type(float))
        if dtype not in self._device_cache:
            self._device_cache[dtype] = jax.tree.map(
                lambda a: jnp.asarray(a, dtype=dtype), self.net
            )
        return self._device_cache[dtype]

    def kernel_params(self, dtype=None):
        """``(KernelNet, activation)`` for :func:`predict_kernel` / :func:`kernel_forward`.

        The one-hidden-layer pixel net rearranged for the hot path (see
        :func:`kernel_layout`), folded in float64 and cached per ``dtype``; ``None``
        for other networks.
        """
        if self.kind != "pixel" or len(self.net.weights) != 2:
            return None
        key = ("kernel", self.params(dtype).biases[-1].dtype)
        if key not in self._device_cache:
            k, act = kernel_layout(
                PixelNet(
                    tuple(np.asarray(w, np.float64) for w in self.net.weights),
                    tuple(np.asarray(b, np.float64) for b in self.net.biases),
                ),
                self.activation,
                xp=np,
            )
            dt = key[1]
            self._device_cache[key] = (
                KernelNet(*(jnp.asarray(np.ascontiguousarray(a), dtype=dt) for a in k)),
                act,
            )
        return self._device_cache[key]

    def local_error_rows(self, dtype=None):
        """:meth:`LocalError.stacked` of :attr:`local_error` with this emulator's
        ``error_basis``, a device array of ``dtype`` cached like :meth:`params`
        (the rows a star's covariance gathers); None without a ``local_error``."""
        if self.local_error is None:
            return None
        key = (
            "local_error",
            jax.dtypes.canonicalize_dtype(dtype or jnp.result_type(float)),
        )
        if key not in self._device_cache:
            rows = self.local_error.stacked(self.error_basis)
            self._device_cache[key] = jnp.asarray(rows, dtype=key[1])
        return self._device_cache[key]

    def scale(self, labels) -> np.ndarray:
        """Physical labels (..., L) -> scaled labels (box -> [-0.5, 0.5])."""
        return scale_labels(
            np.asarray(labels, dtype=float), self.label_lo, self.label_hi
        )

    def unscale(self, scaled) -> np.ndarray:
        """Scaled labels (..., L) -> physical labels."""
        return unscale_labels(
            np.asarray(scaled, dtype=float), self.label_lo, self.label_hi
        )

    def check_labels(
        self, labels, *, allow_outside: bool = False, name: str = "labels"
    ) -> np.ndarray:
        """Validate physical labels; returns them as a (n, L) float64 copy.

        ``name`` is the argument named in the error messages (e.g. ``"p0"``).

        Raises:
            ValueError: wrong shape, non-finite values, or (unless ``allow_outside``)
                a value outside the training box, naming the label and the value.
        """
        x = as_float_array(labels, name, ndim=(1, 2))
        x2 = x[None] if x.ndim == 1 else x
        if x2.shape[1] != self.n_labels:
            raise ValueError(
                f"{name} {x.shape} must have {self.n_labels} columns "
                f"({', '.join(self.label_names)})"
            )
        check_finite(x2, name)
        if not allow_outside:
            out = (x2 < self.label_lo) | (x2 > self.label_hi)
            if out.any():
                i, j = (int(v) for v in np.argwhere(out)[0])
                hint = (
                    "; pass allow_outside=True to extrapolate"
                    if name == "labels"
                    else ""
                )
                raise ValueError(
                    f"{name}[{i}] {self.label_names[j]} = {float(x2[i, j]):g} is outside the "
                    f"training box [{float(self.label_lo[j]):g}, {float(self.label_hi[j]):g}] "
                    f"({int(out.any(axis=1).sum())} row(s) outside){hint}"
                )
        return x2

    def predict(
        self,
        labels,
        *,
        allow_outside: bool = False,
        dtype=None,
        batch_size: int | None = None,
        fast_tanh: bool = True,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Normalised flux for physical labels.

        Args:
            labels: (n, L) or (L,) physical labels in the order of ``label_names``.
            allow_outside: evaluate outside the training box (extrapolation) instead
                of raising.
            dtype: computation dtype (default: JAX's default float, float32 unless
                x64 is enabled).
            batch_size: spectra per jitted call (default :data:`PREDICT_CHUNK`).
                Every call gets exactly this many rows (the last chunk is padded)
                and the count of real ones, so one compilation serves every ``n``
                and a row's result does not depend on the call it is in. A chunk
                with at most 8 or 64 real rows evaluates only those (see
                :func:`predict_chunk`), so a few spectra do not pay for a chunk.
            fast_tanh: float32 one-hidden-layer tanh or sigmoid networks (the
                default; no effect otherwise): evaluate tanh with
                :func:`tanh_rational` (max error 4.5e-7 per activation, against
                2.9e-7 for ``jnp.tanh``) and the sums added as pairwise trees:
                about a third less CPU time than ``jnp.tanh``. For the real Payne
                network and 10,000 labels across its box the flux differs from
                ``fast_tanh=False`` by at most 6.0e-7 (relative 9.7e-7; median
                6e-8, one float32 unit in the last place), and from The Payne's
                float64 code by 4.2e-7 (3.3e-7).
                ``fast_tanh=False`` evaluates ``jnp.tanh``, the fitter's model
                (:func:`kernel_forward`) to float32 rounding: use it to make
                spectra that a float32 fit must match to the last bit.
            out: optional NumPy array to write the flux into (and return), of the
                shape and dtype that would be returned. Without it, a result of
                4 MB or more is made in the memory of an earlier large result that
                has been freed, if there is one (kept for reuse; see
                ``payne_lite/emulator/_outpool.py``), which saves the operating
                system's page faults and zeroing of fresh pages: for 10,000 x
                7214 float32 (288 MB) 30-40 ms on the quiet 2-core machine of
                benchmarks/bench_emulator.py, against about 150 ms for the
                evaluation, 0.4 s under load.

        Returns:
            (n, P) flux, or (P,) for a single label vector, as NumPy (``out`` if
            given).
        """
        x = self.check_labels(labels, allow_outside=allow_outside)
        size = PREDICT_CHUNK if batch_size is None else batch_size
        if size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        net = self.params(dtype)
        dt = net.biases[-1].dtype
        kernel = self.kernel_params(dtype)
        # scaled in float64, rounded to the computation dtype once, on the host
        s = self.scale(x).astype(dt)
        n = s.shape[0]
        shape = (self.n_pix,) if np.ndim(labels) == 1 else (n, self.n_pix)
        if out is None:  # large results reuse freed earlier results' memory
            result = _outpool.empty(shape, dt)
        elif not isinstance(out, np.ndarray) or out.shape != shape or out.dtype != dt:
            raise ValueError(
                f"out must be a NumPy array of shape {shape} and dtype {dt}, got "
                f"{type(out).__name__} {getattr(out, 'shape', '')} "
                f"{getattr(out, 'dtype', '')}"
            )
        elif not out.flags.writeable:
            raise ValueError("out is read-only")
        else:
            result = out
        rows = result[None] if result.ndim == 1 else result  # views: (n, P)
        # Fixed-size chunks, dispatched one ahead: chunk i+1 is queued (JAX dispatch
        # is asynchronous) before chunk i is copied into the result.
        params, act = kernel if kernel is not None else (net, self.activation)
        fast_tanh = bool(fast_tanh) and kernel is not None  # no effect otherwise
        pending = None
        for start in range(0, n, size):
            chunk = s[start : start + size]
            m = chunk.shape[0]
            if m < size:
                chunk = np.concatenate([chunk, np.zeros((size - m, s.shape[1]), dt)])
            # a NumPy chunk goes to the device inside the jitted call's C++ dispatch
            # (35 us per call here, against 156 us with jnp.asarray first)
            res = predict_chunk(params, chunk, m, act, fast_tanh=fast_tanh)
            if pending is not None:
                _copy_rows(rows, *pending)
            pending = (start, res)
        if pending is not None:
            _copy_rows(rows, *pending)
        return result

    def validate(self, grid, *, batch_size: int | None = None) -> ValidationReport:
        """A :class:`ValidationReport` of this emulator on the held-out ``grid``.

        The same tables as the report written by training (same bins of the
        training box), recomputed on ``grid``'s spectra; the coverage maps (of the
        training labels) are carried over from :attr:`report` when there is one.
        Pixels with a non-finite or non-positive ``flux_err`` are left out.

        Args:
            grid: a :class:`payne_lite.SpectralGrid` with this emulator's label
                names (same order) and wavelength grid; labels outside the box are
                evaluated (extrapolated) and counted in the end bins.
            batch_size: passed to :meth:`predict`.

        Raises:
            ValueError: other label names or another wavelength grid.
        """
        self._check_grid(grid)
        pred = self.predict(grid.labels, allow_outside=True, batch_size=batch_size)
        err = np.abs(pred.astype(np.float32) - grid.flux)
        if grid.flux_err is not None:
            good = np.isfinite(grid.flux_err) & (grid.flux_err > 0)
            err = np.where(good, err, np.nan)
        old = self.report
        digest = grid_digest(grid)
        report = ValidationReport.from_errors(
            err,
            grid.labels,
            label_names=self.label_names,
            label_units=self.label_units,
            label_lo=self.label_lo,
            label_hi=self.label_hi,
            provenance={
                "held_out": f"Emulator.validate on a grid of sha256 {digest[:16]}...",
                "validated_grid_sha256": digest,
                "validated_grid_meta": grid.meta,
                **{
                    k: v
                    for k, v in (old.provenance if old is not None else {}).items()
                    if k in ("grid_sha256", "grid_meta", "config")
                },
            },
        )
        if old is not None and old.coverage is not None:
            report = dataclasses.replace(
                report, coverage=old.coverage, coverage_2d=old.coverage_2d
            )
        return report

    def with_error_basis(self, grid, *, rank: int = 256) -> Emulator:
        """A copy whose correlated error comes from the held-out spectra ``grid``.

        ``error_basis`` becomes the ``rank`` leading principal components of the
        errors ``predict(labels) - flux`` over ``grid`` (scaled so that
        ``error_basis.T @ error_basis`` is their covariance truncated to that
        rank) and ``pixel_error`` their per-pixel RMS; the ``error_scale``
        (calibrated on the old basis) is dropped. Pixels with a non-finite or
        non-positive ``flux_err`` count as zero error.

        What it is for: generalised least squares (``LMOptions(estimator="gls")``)
        and the samplers trust every direction the basis does not span. Measured
        on a student of the real APOGEE network at S/N 300, their 1-sigma
        coverage was 0.30-0.55 with the 32 components a training keeps from its
        200 validation spectra and 0.53-0.75 with 256 from 500 or more held-out
        spectra (benchmarks/README.md, "What the error covariance needs").

        Args:
            grid: a :class:`payne_lite.SpectralGrid` of spectra the emulator was
                not trained on (not its training grid: those errors are too
                small), with its label names and wavelength grid.
            rank: components kept, at most ``grid.n_spec - 1``.

        Raises:
            ValueError: another grid, or ``rank`` out of range.
        """
        self._check_grid(grid)
        rank = int(rank)
        if not 1 <= rank < grid.n_spec:
            raise ValueError(
                f"rank must be 1 .. {grid.n_spec - 1} (below the {grid.n_spec} held-"
                f"out spectra; >= 2 x rank of them recommended), got {rank}"
            )
        resid = self._held_out_errors(grid)
        meta = dict(self.meta)
        meta.pop("error_scale", None)
        meta["error_basis"] = {
            "rank": rank,
            "n_held_out": int(grid.n_spec),
            "held_out_grid_sha256": grid_digest(grid),
        }
        return dataclasses.replace(
            self,
            error_basis=error_basis_of(resid, rank),
            pixel_error=np.sqrt(np.mean(resid * resid, axis=0)).astype(np.float32),
            error_scale=None,
            meta=meta,
        )

    def with_local_error(
        self, grid, *, neighbours: int = LOCAL_NEIGHBOURS, shrink: float = LOCAL_SHRINK
    ) -> Emulator:
        """A copy whose error covariance depends on the labels: :class:`LocalError`
        from the held-out spectra ``grid``.

        Generalised least squares (``LMOptions(estimator="gls")``) and the samplers
        then take the emulator's error covariance at a star's labels from the
        ``neighbours`` held-out errors nearest them, not from the one
        ``error_basis``; the default fit (its sandwich with ``error_basis`` and
        ``error_scale``) is unchanged. Measured on the shipped default emulator,
        where one covariance of 256-1,024 components left GLS too narrow at S/N
        300 (sd of z 1.4-1.8): with 100 nearest of 4,000 held-out errors its GLS
        fits covered 0.63-0.76 of the truths at S/N 30, 100 and 300 (sd of z
        0.93-1.10); of 2,000, 0.62-0.67 at S/N 300 (benchmarks/README.md, "A
        label-dependent error covariance").

        Each held-out error's Doppler shift along its own spectrum's rv derivative
        is kept apart (``local_error.shifts``) and taken out of the stored error;
        the neighbours' mean squared shift is added to a fit's rv variance (along
        the star's own rv derivative in the samplers' ``C``).

        The file grows by the errors (N x P float32, compressed): 4,000 held-out
        spectra of APOGEE's 7,214 pixels are ~115 MB before compression.

        Args:
            grid: a :class:`payne_lite.SpectralGrid` of spectra the emulator was
                not trained on, spread over the box (4,000 did better than 2,000
                for five labels), with its label names and wavelength grid.
            neighbours: held-out errors averaged at any labels (100-200
                measured; at most ``grid.n_spec``).
            shrink: weight of the global error model (``error_basis``,
                ``pixel_error``) in the covariance (:class:`LocalError`).

        Raises:
            ValueError: another grid, or ``neighbours`` out of range.
        """
        self._check_grid(grid)
        errors, pred = self._held_out_errors(grid, with_model=True)
        # each error's Doppler shift is kept apart from the rest of it: the star's
        # own rv derivative carries it (LocalError's module docstring)
        d = rv_derivative(self.wavelength, pred)
        shifts = shifts_along(d, errors)
        errors = errors + shifts[:, None] * d
        local = LocalError(
            errors, self.scale(grid.labels), int(neighbours), float(shrink), shifts
        )
        meta = dict(self.meta)
        meta["local_error"] = {
            "neighbours": local.neighbours,
            "shrink": local.shrink,
            "n_held_out": int(grid.n_spec),
            "held_out_grid_sha256": grid_digest(grid),
        }
        return dataclasses.replace(self, local_error=local, meta=meta)

    def _held_out_errors(self, grid, with_model: bool = False):
        """(N, P) float64 ``predict(labels) - flux`` over ``grid``, 0 where its
        ``flux_err`` is non-finite or non-positive (or the flux non-finite); with
        ``with_model`` also the predictions."""
        pred = np.asarray(self.predict(grid.labels, allow_outside=True), np.float64)
        resid = pred - grid.flux
        if grid.flux_err is not None:
            good = np.isfinite(grid.flux_err) & (grid.flux_err > 0)
            resid = np.where(good, resid, 0.0)
        resid = np.nan_to_num(resid)
        return (resid, pred) if with_model else resid

    def _check_grid(self, grid) -> None:
        """ValueError unless ``grid`` has this emulator's labels and wavelengths."""
        if tuple(grid.label_names) != self.label_names:
            raise ValueError(
                f"grid labels {list(grid.label_names)} differ from the emulator's "
                f"{list(self.label_names)}"
            )
        if grid.n_pix != self.n_pix or not np.allclose(
            grid.wavelength, self.wavelength, rtol=1e-9, atol=0.0
        ):
            raise ValueError(
                f"grid wavelengths ({grid.n_pix} pixels, {grid.wavelength[0]:.6g}-"
                f"{grid.wavelength[-1]:.6g}) differ from the emulator's ({self.n_pix}, "
                f"{self.wavelength[0]:.6g}-{self.wavelength[-1]:.6g})"
            )

    # -- files ----------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write the emulator to one versioned HDF5 file (atomically;
        :mod:`payne_lite.emulator._file`)."""
        write_emulator(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Emulator:
        """Read an emulator written by :meth:`save`, refusing anything inconsistent.

        Raises:
            FileNotFoundError: no such file.
            payne_lite.FileFormatError: not an emulator file, another format version,
                corrupt/truncated data, or contents that do not fit together (for
                example a wavelength grid whose length differs from the network's).
        """
        kw = read_emulator_fields(path)
        try:
            return cls(**kw)
        except ValueError as err:
            raise FileFormatError(f"{path}: inconsistent emulator file: {err}") from err

    @classmethod
    def from_payne_npz(
        cls,
        path: str | os.PathLike,
        *,
        label_names: Sequence[str] | None = None,
        wavelength=None,
        label_units: Sequence[str] | None = None,
        flux_scale: float = 1.0,
    ) -> Emulator:
        """Import a network trained with The Payne (Ting et al. 2019).

        Two layouts are recognised from the arrays' shapes:

        * the classic per-pixel network, ``w_array_0 (P,H,L), b_array_0 (P,H),
          w_array_1 (P,H), b_array_1 (P,)``, sigmoid hidden units;
        * the later 2-hidden-layer MLP for all pixels, ``w_array_0 (H1,L),
          w_array_1 (H2,H1), w_array_2 (P,H2)`` and ``b_array_0..2``, leaky ReLU
          (slope 0.01).

        Both carry ``x_min``, ``x_max`` (L,), the training box.

        Args:
            path: the ``.npz`` file.
            label_names: L names in the network's label order (default
                ``label_0..``); The Payne kept the order only in its docs, so give it.
            wavelength: (P,) wavelength [Angstrom]; required unless the file has a
                ``wavelength`` array.
            label_units: L units (default empty strings).
            flux_scale: multiply the output by this (for example ``1e-6`` for The
                Payne's unnormalised networks, which predict ``1e6 f_lambda``); folded
                exactly into the last layer.
        """
        path = os.fspath(path)
        data = _h5.read_npz(
            path,
            ("w_array_0", "w_array_1", "b_array_0", "b_array_1", "x_min", "x_max"),
            "a Payne network",
        )
        w0 = data["w_array_0"]
        if w0.ndim == 3:
            n_layers = 2
            while f"w_array_{n_layers}" in data:
                n_layers += 1
            cls_net, activation = PixelNet, "sigmoid"
        elif w0.ndim == 2 and "w_array_2" in data:
            n_layers = 3
            cls_net, activation = DenseNet, "leaky_relu"
        else:
            raise FileFormatError(
                f"{path}: w_array_0 {w0.shape} is neither a "
                "per-pixel (P,H,L) nor a dense (H,L) network"
            )
        try:
            weights = [np.asarray(data[f"w_array_{i}"]) for i in range(n_layers)]
            biases = [np.asarray(data[f"b_array_{i}"]) for i in range(n_layers)]
        except KeyError as err:
            raise FileFormatError(f"{path}: missing {err.args[0]}") from err
        if flux_scale != 1.0:  # in float64: exact to ~1e-16, not float32 rounding
            weights[-1] = np.asarray(weights[-1], dtype=np.float64) * flux_scale
            biases[-1] = np.asarray(biases[-1], dtype=np.float64) * flux_scale
        n_lab = w0.shape[-1]
        if wavelength is None:
            if "wavelength" not in data:
                raise ValueError(
                    f"{path} has no wavelength array: pass wavelength= "
                    f"(the pixel grid the network was trained on)"
                )
            wavelength = data["wavelength"]
        return cls(
            net=cls_net(tuple(weights), tuple(biases)),
            activation=activation,
            label_names=label_names or [f"label_{i}" for i in range(n_lab)],
            label_units=label_units or [""] * n_lab,
            label_lo=data["x_min"],
            label_hi=data["x_max"],
            wavelength=wavelength,
            meta={
                "source": f"The Payne npz: {os.path.basename(path)}",
                "flux_scale": flux_scale,
            },
        )
