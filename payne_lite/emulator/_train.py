"""Training per-pixel emulators: every pixel at once, as one vectorised problem.

Two optimisers, chosen by :attr:`TrainConfig.optimizer`:

``"lm"`` (default)
    Levenberg-Marquardt vmapped over pixels. Each pixel's network has only a few dozen
    parameters, so the damped normal equations ``(J^T J + lambda diag(J^T J)) d = -J^T r``
    of every pixel are solved exactly at each iteration, with a per-pixel damping
    ``lambda`` (divided by 3 on an accepted step, multiplied by 4 on a rejected one).
    Full-batch, second order: it reaches a given error in far fewer passes than Adam
    (see ``benchmarks/bench_training.py`` for the measurement behind this default).
``"adam"``
    optax Adam on mini-batches of spectra, all pixels at once (the classic recipe).

Both keep, per pixel, the parameters with the lowest validation loss seen so far, stop a
pixel when its validation loss has not improved by ``min_improvement`` (relative) for
``patience`` iterations, and re-initialise stalled pixels whose validation error is far
above the typical pixel's (``restart_threshold`` times the median RMS; up to
``max_restarts`` times each; the best parameters so far are kept, so a restart never
makes a pixel worse).

Multi-device: the pixel axis is sharded over all local devices (``jax.sharding``); the
same code runs on one CPU or on a GPU node. Randomness comes from ``seed`` only.

This module holds the host-side drivers; the jitted kernels are in
:mod:`payne_lite.emulator._train_steps`, the checkpoint file in
:mod:`payne_lite.emulator._train_ckpt`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as PS
from tqdm.auto import tqdm

from .._validate import check_finite
from ..errors import TrainingDivergedError
from ..grid import SpectralGrid
from ._emulator import Emulator, error_basis_of
from ._nets import ACTIVATIONS, PixelNet
from ._report import ValidationReport
from ._train_ckpt import (
    RESUMABLE_CHANGES,
    TrainCheckpoint,
    grid_digest,
    resume_state,
    state_array,
)
from ._train_steps import (
    device_mesh,
    fwd,
    init_theta,
    lm_step,
    make_adam_step,
    net_to_theta,
    pixel_template,
    theta_to_net,
    valid_stats,
)

log = logging.getLogger("payne_lite.emulator")  # one logger per stage


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Settings of one training run (stored in the emulator file's ``meta``).

    Attributes:
        hidden: hidden-layer width(s) of each pixel's network, e.g. ``10`` or ``(10, 10)``.
        activation: a name from :data:`payne_lite.emulator.ACTIVATIONS`.
        optimizer: ``"lm"`` (Levenberg-Marquardt, default) or ``"adam"``.
        max_iter: LM iterations, or Adam epochs.
        valid_fraction: fraction of the grid held out for validation / early stopping.
        patience: iterations without relative improvement ``min_improvement`` of a
            pixel's validation loss before the pixel stops (or restarts).
        min_improvement: relative improvement that resets a pixel's patience.
        restart_threshold: a stalled pixel restarts from a new random point when its
            validation RMS exceeds this many times the median pixel's.
        max_restarts: re-initialisations allowed per pixel.
        pixel_batch: pixels per jitted LM step (memory ~ n_train * pixel_batch *
            n_params * 4 bytes for the Jacobian); rounded up to a multiple of the
            device count.
        lm_lambda0: initial LM damping.
        learning_rate: Adam step size.
        batch_size: Adam mini-batch size (spectra).
        init_scale: standard deviation of the first-layer weights at initialisation.
        seed: seed of the split, the initialisation and the restarts.
        divergence_factor: the run stops (:class:`TrainingDivergedError`) when the
            median validation RMS of the active pixels exceeds this many times the
            median RMS of the starting networks (which predict each pixel's mean
            flux), i.e. when the loss explodes; a NaN or infinite loss stops it too.
    """

    hidden: int | tuple[int, ...] = 10
    activation: str = "sigmoid"
    optimizer: str = "lm"
    max_iter: int = 150
    valid_fraction: float = 0.2
    patience: int = 15
    min_improvement: float = 1e-3
    restart_threshold: float = 3.0
    max_restarts: int = 2
    pixel_batch: int = 64
    lm_lambda0: float = 1e-2
    learning_rate: float = 1e-2
    batch_size: int = 256
    init_scale: float = 2.0
    seed: int = 0
    divergence_factor: float = 1e3

    def __post_init__(self):
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        if not hidden or any(int(h) <= 0 for h in hidden):
            raise ValueError(f"hidden must be positive width(s), got {self.hidden!r}")
        object.__setattr__(self, "hidden", tuple(int(h) for h in hidden))
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not one of {sorted(ACTIVATIONS)}"
            )
        if self.optimizer not in ("lm", "adam"):
            raise ValueError(
                f"optimizer must be 'lm' or 'adam', got {self.optimizer!r}"
            )
        for name in ("max_iter", "patience", "pixel_batch", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise ValueError(
                f"valid_fraction must be in (0, 1), got {self.valid_fraction!r}"
            )
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts!r}")
        for name in (
            "learning_rate",
            "lm_lambda0",
            "init_scale",
            "restart_threshold",
            "divergence_factor",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
def _sqrt_weights(grid: SpectralGrid, dtype) -> np.ndarray:
    """sqrt(inverse variance), 0 for unusable pixels; all ones without flux errors."""
    if grid.flux_err is None:
        return np.ones(grid.flux.shape, dtype=dtype)
    err = np.asarray(grid.flux_err, dtype=np.float64)
    good = np.isfinite(err) & (err > 0)
    w = np.where(good, 1.0 / np.where(good, err, 1.0), 0.0)
    # Normalise per pixel so that the LM damping and the stopping rule see O(1) numbers.
    scale = np.max(w, axis=0, keepdims=True)
    return (w / np.where(scale > 0, scale, 1.0)).astype(dtype)


class _PixelTracker:
    """Best-on-validation bookkeeping per pixel: patience, stopping and restarts."""

    def __init__(self, n_pix: int, cfg: TrainConfig):
        self.cfg = cfg
        self.best = np.full(n_pix, np.inf)
        self.best_mae = np.full(n_pix, np.inf)  # median |error| of the kept parameters
        self.stall = np.zeros(n_pix, dtype=int)
        self.restarts = np.zeros(n_pix, dtype=int)
        self.active = np.ones(n_pix, dtype=bool)

    def update(self, val_mse: np.ndarray, val_mae: np.ndarray) -> np.ndarray:
        """Record this iteration's validation MSE and median |error| per pixel.

        Returns the mask of pixels whose parameters are the best so far (to keep).
        """
        improved = val_mse < self.best * (1.0 - self.cfg.min_improvement)
        better = val_mse < self.best
        self.best = np.where(better, val_mse, self.best)
        self.best_mae = np.where(better, val_mae, self.best_mae)
        self.stall = np.where(improved, 0, self.stall + 1)
        return better

    def to_restart(self) -> np.ndarray:
        """Stalled pixels whose error is far above the median pixel's."""
        stalled = self.active & (self.stall >= self.cfg.patience)
        typical = (
            np.median(self.best[np.isfinite(self.best)])
            if np.isfinite(self.best).any()
            else np.inf
        )
        bad = self.best > (self.cfg.restart_threshold**2) * typical
        return stalled & bad & (self.restarts < self.cfg.max_restarts)

    def retire(self) -> None:
        """Stop pixels that have stalled and will not restart."""
        self.active &= ~((self.stall >= self.cfg.patience) & ~self.to_restart())


def _check_divergence(
    it, cfg, tracker, train_loss, val_mse, ref_mse, n_pix, wave, ckpt, optimizer
) -> None:
    """Raise TrainingDivergedError on a non-finite or exploding loss of active pixels."""
    act = tracker.active.copy()
    act[n_pix:] = False
    bad = act & ~(np.isfinite(train_loss) & np.isfinite(val_mse))
    where = (
        ckpt.describe()
        if ckpt is not None
        else "no checkpoint was kept (pass checkpoint=PATH to keep one)"
    )
    if bad.any():
        i = int(np.argmax(bad))
        raise TrainingDivergedError(
            f"training ({optimizer}) diverged at iteration {it + 1}: non-finite loss "
            f"for {int(bad.sum())} pixel(s), first pixel {i} at {wave[i]:.6g} A "
            f"(non-finite flux, labels or errors in the grid?); {where}"
        )
    if act.any():
        now = float(np.sqrt(np.median(val_mse[act])))
        start = float(np.sqrt(np.median(ref_mse[:n_pix])))
        if now > cfg.divergence_factor * max(start, 1e-12):
            raise TrainingDivergedError(
                f"training ({optimizer}) diverged at iteration {it + 1}: median "
                f"validation RMS {now:.3g} is more than divergence_factor="
                f"{cfg.divergence_factor:g} times the starting {start:.3g} (a smaller "
                f"learning_rate or lm_lambda0?); {where}"
            )


def _split_and_check(grid, valid, cfg: TrainConfig, checkpoint_every):
    """The (training, validation) grids, checked: ``valid`` split off ``grid`` when
    None, else on the same wavelengths and labels; finite labels and flux; a
    positive int ``checkpoint_every``. Raises ValueError naming what is wrong."""
    if valid is None:
        train, valid = grid.split(cfg.valid_fraction, seed=cfg.seed)
    else:
        train = grid
        if valid.n_pix != grid.n_pix or not np.allclose(
            valid.wavelength, grid.wavelength
        ):
            raise ValueError(
                "valid grid has another wavelength grid than the training grid"
            )
        if valid.label_names != grid.label_names:
            raise ValueError(
                f"valid labels {valid.label_names} differ from {grid.label_names}"
            )
    if train.n_spec < 2:
        raise ValueError(f"need at least 2 training spectra, got {train.n_spec}")
    for which, g in (("grid", train), ("valid", valid)):
        # SpectralGrid checks on construction; its arrays can be changed in place since
        for name in ("labels", "flux"):
            check_finite(np.asarray(getattr(g, name)), f"{which} {name}")
    if (
        isinstance(checkpoint_every, bool)
        or int(checkpoint_every) != checkpoint_every
        or (checkpoint_every <= 0)
    ):
        raise ValueError(
            f"checkpoint_every must be a positive int, got {checkpoint_every!r}"
        )
    return train, valid


def _held_out_stats(theta, unravel, valid, lo, hi, cfg: TrainConfig, dtype):
    """Final held-out statistics of the kept parameters ``theta`` (P, n_par): per-pixel
    validation RMS (P,) and median |error| (P,) in flux units, the error basis
    (K, P) (see :func:`_error_basis`) and |error| (N, P) float32 of every held-out
    spectrum (NaN at pixels without weight), for the validation report."""
    s_v = jnp.asarray((valid.labels - lo) / (hi - lo) - 0.5, dtype=dtype)
    sw_v = jnp.asarray(_sqrt_weights(valid, dtype))
    th = jnp.asarray(theta, dtype=dtype)
    kw = dict(unravel=unravel, activation=cfg.activation)
    _, rms, mae = valid_stats(
        th, s_v, jnp.asarray(valid.flux.T, dtype=dtype), sw_v.T, **kw
    )
    rms, mae = np.asarray(rms), np.asarray(mae)
    # |error| of every held-out spectrum, REPORT_PIXELS pixels' networks at a time
    abs_err = np.empty(valid.flux.shape, np.float32)
    for start in range(0, valid.n_pix, REPORT_PIXELS):
        sl = slice(start, start + REPORT_PIXELS)
        pred = np.asarray(_fwd_jit(th[sl], s_v, **kw), np.float32).T
        abs_err[:, sl] = np.abs(pred - valid.flux[:, sl])
    abs_err[np.asarray(sw_v) == 0] = np.nan
    nb = min(valid.n_spec, ERROR_BASIS_MAX_SPECTRA)  # the split is random already
    basis = _error_basis(
        fwd(th, s_v[:nb], **kw), valid.flux[:nb].T, np.asarray(sw_v[:nb].T)
    )
    return rms, mae, basis, abs_err


#: Pixels whose held-out predictions are made per call for the validation report.
REPORT_PIXELS = 512
_fwd_jit = jax.jit(fwd, static_argnames=("unravel", "activation"))


def _report(abs_err, train, valid, grid, lo, hi, cfg, meta, external: bool):
    """The :class:`ValidationReport` written with a trained emulator."""
    held_out = (
        f"a separate validation grid (sha256 {grid_digest(valid)[:16]}...)"
        if external
        else f"split off the training grid, valid_fraction {cfg.valid_fraction:g}, "
        f"seed {cfg.seed}"
    )
    return ValidationReport.from_errors(
        abs_err,
        valid.labels,
        label_names=grid.label_names,
        label_units=grid.label_units,
        label_lo=lo,
        label_hi=hi,
        train_labels=train.labels,
        provenance={
            "held_out": held_out,
            "grid_sha256": grid_digest(grid),
            "grid_meta": grid.meta,
            "config": meta["config"],
            "train_seconds": meta["train_seconds"],
            "devices": meta["devices"],
            "dtype": meta["dtype"],
            "n_train": meta["n_train"],
            "n_valid": meta["n_valid"],
        },
    )


def train_emulator(
    grid: SpectralGrid,
    *,
    hidden: int | tuple[int, ...] | None = None,
    seed: int | None = None,
    config: TrainConfig | None = None,
    valid: SpectralGrid | None = None,
    progress: bool = True,
    dtype=None,
    checkpoint: str | os.PathLike | None = None,
    resume: bool = False,
    checkpoint_every: int = 10,
    init: Emulator | None = None,
    **overrides,
) -> Emulator:
    """Train a per-pixel emulator on a grid of spectra.

    Args:
        grid: training spectra (labels, flux, optional flux_err).
        hidden: hidden width(s) per pixel network; overrides ``config.hidden``
            (default 10).
        seed: seed for the split, initialisation and restarts; overrides
            ``config.seed`` (default 0).
        config: full settings (default ``TrainConfig()``); keyword ``overrides``
            replace fields of it, e.g. ``max_iter=60``.
        valid: a separate validation grid; by default ``config.valid_fraction`` of
            ``grid`` is held out.
        progress: show a progress bar.
        dtype: float dtype of training (default: JAX's default float).
        checkpoint: path of an HDF5 checkpoint file, written (atomically) every
            ``checkpoint_every`` iterations and when the run ends: parameters,
            optimiser and RNG state, per-pixel bookkeeping, loss curves, the config
            and digests of the grids. An existing file is refused unless ``resume``.
        resume: continue from ``checkpoint`` (if the file exists; otherwise start
            afresh, so a requeued job can always pass it). The checkpoint must come
            from the same grid(s), dtype, pixel layout and config, except
            ``max_iter``, which may grow to train longer; anything else is refused
            (``ValueError`` naming it). A resumed run gives the parameters of an
            uninterrupted one.
        checkpoint_every: iterations (LM) or epochs (Adam) between checkpoints.
        init: warm start: an emulator (per-pixel networks of the same widths and
            activation, same labels and number of pixels) whose parameters start
            the run instead of random ones, e.g. the last one trained on a grid that
            has since grown (:func:`~payne_lite.emulator.active_learning`). Its
            label box may differ from this grid's: the first layer is re-scaled
            exactly. Restarts of stalled pixels are still random.

    Returns:
        The :class:`Emulator` with the best-on-validation parameters per pixel, its
        per-pixel validation RMS (``pixel_error``) and loss curves (``history``).

    Raises:
        TrainingDivergedError: the loss became NaN/inf or exploded (see
            ``TrainConfig.divergence_factor``); the last checkpoint is kept.
        ValueError: bad settings or grids (named); a checkpoint of another run.
        FileExistsError: ``checkpoint`` exists and ``resume`` is False.

    Examples:
        >>> emu = pl.train_emulator(grid, hidden=10, seed=0)   # doctest: +SKIP
    """
    if not isinstance(grid, SpectralGrid):
        raise TypeError(f"grid must be a SpectralGrid, got {type(grid).__name__}")
    if hidden is not None:
        overrides["hidden"] = hidden
    if seed is not None:
        overrides["seed"] = seed
    cfg = dataclasses.replace(config or TrainConfig(), **overrides)
    external = valid is not None  # a separate validation grid, not a split
    train, valid = _split_and_check(grid, valid, cfg, checkpoint_every)
    dtype = jnp.dtype(dtype or jnp.result_type(float))
    # The training box: the grid's design box where it has one, else the labels' range.
    lo = np.minimum(train.label_box[0], valid.label_box[0])
    hi = np.maximum(train.label_box[1], valid.label_box[1])
    if np.any(hi <= lo):
        j = int(np.argmax(hi <= lo))
        raise ValueError(
            f"label {train.label_names[j]!r} takes a single value "
            f"({lo[j]!r}) in the grid: it cannot be learned; drop it"
        )
    theta_init = None if init is None else _init_theta(init, grid, cfg, lo, hi, dtype)
    ckpt = None
    if checkpoint is not None:
        identity = {
            "init_sha256": None if init is None else _digest(theta_init),
            "config": {
                k: v
                for k, v in dataclasses.asdict(cfg).items()
                if k not in RESUMABLE_CHANGES
            },
            "train_grid_sha256": grid_digest(train),
            "valid_grid_sha256": grid_digest(valid),
            "dtype": str(dtype),
        }
        ckpt = TrainCheckpoint(
            checkpoint, json.loads(json.dumps(identity)), int(checkpoint_every)
        )
    elif resume:
        raise ValueError("resume=True needs checkpoint=PATH")
    t0 = time.perf_counter()
    fit = _train_lm if cfg.optimizer == "lm" else _train_adam
    theta, unravel, tracker, history = fit(
        train, valid, lo, hi, cfg, dtype, progress, ckpt=ckpt, resume=resume,
        init=theta_init,
    )  # fmt: skip
    net = theta_to_net(theta, unravel)
    rms, mae, basis, abs_err = _held_out_stats(
        theta, unravel, valid, lo, hi, cfg, dtype
    )
    elapsed = time.perf_counter() - t0
    meta = {
        "trained_by": "payne_lite.train_emulator",
        "config": dataclasses.asdict(cfg),
        "n_train": int(train.n_spec),
        "n_valid": int(valid.n_spec),
        "train_seconds": elapsed,
        "devices": [str(d) for d in jax.devices()],
        "dtype": str(dtype),
        "valid_median_abs_error": float(np.median(mae)),
        "valid_p99_pixel_abs_error": float(np.percentile(mae, 99)),
        "n_restarted_pixels": int((tracker.restarts > 0).sum()),
        "grid_meta": grid.meta,
        "warm_start": init is not None,
    }
    log.info(
        "trained %d pixels in %.1f s: held-out median |err| %.2e, 99th pct pixel %.2e",
        grid.n_pix,
        elapsed,
        meta["valid_median_abs_error"],
        meta["valid_p99_pixel_abs_error"],
    )
    return Emulator(
        net=net,
        activation=cfg.activation,
        label_names=grid.label_names,
        label_units=grid.label_units,
        label_lo=lo,
        label_hi=hi,
        wavelength=grid.wavelength,
        pixel_error=rms,
        history=history,
        meta=meta,
        error_basis=basis,
        report=_report(abs_err, train, valid, grid, lo, hi, cfg, meta, external),
    )


def _init_theta(init, grid, cfg: TrainConfig, lo, hi, dtype) -> np.ndarray:
    """The warm start's flat parameters (P, n_par) over the box (lo, hi); ValueError
    naming what does not match the grid or the config."""
    if not isinstance(init, Emulator) or not isinstance(init.net, PixelNet):
        raise ValueError("init must be an Emulator of per-pixel networks (PixelNet)")
    widths = tuple(int(w.shape[1]) for w in init.net.weights[:-1])
    for what, theirs, ours in (
        ("labels", tuple(init.label_names), tuple(grid.label_names)),
        ("pixels", init.n_pix, grid.n_pix),
        ("hidden", widths, cfg.hidden),
        ("activation", init.activation, cfg.activation),
    ):
        if theirs != ours:
            raise ValueError(f"init emulator has {what} {theirs!r}, training {ours!r}")
    box = (init.label_lo, init.label_hi)
    return net_to_theta(init.net, box, (lo, hi), dtype)


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


#: Principal components of the held-out errors kept as ``Emulator.error_basis``.
ERROR_BASIS_RANK = 32
#: At most this many held-out spectra enter the basis (an SVD of N x P: N^2 P).
ERROR_BASIS_MAX_SPECTRA = 512


def _error_basis(pred, flux, sw) -> np.ndarray:
    """(K, P) leading principal components of the held-out errors ``pred - flux``
    ((P, N) each; pixels with ``sw == 0`` count as 0), scaled by singular value /
    sqrt(N), so that ``B^T B`` is their covariance truncated to rank K
    (:data:`ERROR_BASIS_RANK`)."""
    r = np.where(np.asarray(sw) > 0, np.asarray(pred, np.float64) - flux, 0.0).T
    return error_basis_of(r, ERROR_BASIS_RANK)


def _prepare(train, valid, lo, hi, cfg, dtype):
    """Scaled labels, flux and weights, padded on the pixel axis to whole chunks."""
    mesh, n_dev = device_mesh()
    n_pix = train.n_pix
    chunk = int(np.ceil(min(cfg.pixel_batch, n_pix) / n_dev) * n_dev)
    n_chunks = int(np.ceil(n_pix / chunk))
    pad = n_chunks * chunk - n_pix
    # Padding repeats the last pixel; its results are dropped at the end.
    idx = np.concatenate([np.arange(n_pix), np.full(pad, n_pix - 1)]).astype(int)
    s_t = ((train.labels - lo) / (hi - lo) - 0.5).astype(dtype)
    s_v = ((valid.labels - lo) / (hi - lo) - 0.5).astype(dtype)
    rep = NamedSharding(mesh, PS())
    row = NamedSharding(mesh, PS("pix", None))
    # Pixel-major (P, N) layout: each pixel's spectra are contiguous.
    data = dict(
        s_t=jax.device_put(s_t, rep),
        s_v=jax.device_put(s_v, rep),
        y_t=np.ascontiguousarray(np.asarray(train.flux, dtype=dtype).T[idx]),
        y_v=np.ascontiguousarray(np.asarray(valid.flux, dtype=dtype).T[idx]),
        sw_t=np.ascontiguousarray(_sqrt_weights(train, dtype).T[idx]),
        sw_v=np.ascontiguousarray(_sqrt_weights(valid, dtype).T[idx]),
    )
    chunks = []
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        chunks.append(
            {
                k: jax.device_put(data[k][sl], row)
                for k in ("y_t", "y_v", "sw_t", "sw_v")
            }
        )
    return data, chunks, idx, chunk, mesh


_HISTORY_KEYS = (
    "train_rms",
    "valid_rms",
    "valid_mae",
    "n_active",
    "n_restarted",
    "seconds",
)


def _start(data, n_lab: int, cfg: TrainConfig, idx, dtype, init):
    """Per-pixel parameter layout, the run's RNG, each pixel's weighted mean flux and
    the starting parameters (n_tot, n_par): random, or ``init`` (P, n_par) padded."""
    _, unravel = ravel_pytree(pixel_template(n_lab, cfg.hidden))
    w2 = data["sw_t"] ** 2
    wmean = np.sum(w2 * data["y_t"], 1) / np.maximum(np.sum(w2, 1), 1e-30)
    rng = np.random.default_rng(cfg.seed)
    if init is not None:
        return unravel, rng, wmean, np.asarray(init, dtype)[idx]
    theta0 = init_theta(rng, idx.size, n_lab, cfg.hidden, wmean, cfg.init_scale, dtype)
    return unravel, rng, wmean, theta0


def _ref_mse(theta: np.ndarray, data, chunks, chunk: int, kw) -> np.ndarray:
    """Validation MSE (n_tot,) of the starting networks (the divergence yardstick)."""
    out = np.empty(theta.shape[0])
    for c, ch in enumerate(chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        mse, _, _ = valid_stats(
            jnp.asarray(theta[sl]), data["s_v"], ch["y_v"], ch["sw_v"], **kw
        )
        out[sl] = np.asarray(mse)
    return out


def _lm_sweep(theta, lam, data, chunks, chunk: int, active, kw):
    """One LM iteration over every chunk that has an active pixel.

    ``theta`` (list of (chunk, n_par)) and ``lam`` (list of (chunk,)) are replaced in
    place by the stepped device arrays. Returns (train_loss, val_mse, val_mae), each
    (n_tot,) = (len(chunks) * chunk,): the weighted training sum of squares after the
    step, and the validation MSE and median |error| (``inf`` for skipped chunks; 0
    training loss).
    """
    n_tot = len(chunks) * chunk
    train_loss = np.zeros(n_tot)
    val_mse = np.full(n_tot, np.inf)
    val_mae = np.full(n_tot, np.inf)
    pending = []  # dispatch every chunk first; read results back once (no per-chunk sync)
    for c, ch in enumerate(chunks):
        if not active[c * chunk : (c + 1) * chunk].any():
            continue
        theta[c], lam[c], loss = lm_step(
            theta[c], lam[c], data["s_t"], ch["y_t"], ch["sw_t"], **kw
        )
        mse, _, mae = valid_stats(theta[c], data["s_v"], ch["y_v"], ch["sw_v"], **kw)
        pending.append((c, loss, mse, mae))
    for c, loss, mse, mae in pending:
        sl = slice(c * chunk, (c + 1) * chunk)
        train_loss[sl], val_mse[sl], val_mae[sl] = (
            np.asarray(loss),
            np.asarray(mse),
            np.asarray(mae),
        )
    return train_loss, val_mse, val_mae


def _restart_lm_pixels(
    restart, theta, lam, tracker, rng, wmean, n_lab: int, cfg, dtype, chunk, rows
):
    """Re-initialise the pixels of mask ``restart`` (n_tot,) from new random points
    (damping back to ``cfg.lm_lambda0``), in the chunked device lists ``theta`` and
    ``lam`` (replaced in place, put with the shardings ``rows = (row2, row)``), and
    count the restarts."""
    row2, row = rows
    new = init_theta(
        rng,
        int(restart.sum()),
        n_lab,
        cfg.hidden,
        wmean[restart],
        cfg.init_scale,
        dtype,
    )
    tracker.restarts[restart] += 1
    tracker.stall[restart] = 0
    pos = np.nonzero(restart)[0]
    for c in np.unique(pos // chunk):
        sl = slice(c * chunk, (c + 1) * chunk)
        th, lm = np.array(theta[c]), np.array(lam[c])
        sel = pos[(pos >= sl.start) & (pos < sl.stop)]
        th[sel - sl.start] = new[np.searchsorted(pos, sel)]
        lm[sel - sl.start] = cfg.lm_lambda0
        theta[c], lam[c] = jax.device_put(th, row2), jax.device_put(lm, row)


def _train_lm(
    train, valid, lo, hi, cfg, dtype, progress, *, ckpt=None, resume=False, init=None
):
    data, chunks, idx, chunk, mesh = _prepare(train, valid, lo, hi, cfg, dtype)
    n_pix, n_lab, n_tot = train.n_pix, train.n_labels, idx.size
    unravel, rng, wmean, theta0 = _start(data, n_lab, cfg, idx, dtype, init)
    n_par = theta0.shape[1]
    kw = dict(unravel=unravel, activation=cfg.activation)
    ref_mse = _ref_mse(theta0, data, chunks, chunk, kw)
    lam0 = np.full(n_tot, cfg.lm_lambda0, dtype=dtype)
    best_theta = theta0.copy()
    tracker = _PixelTracker(n_tot, cfg)
    hist = {k: [] for k in _HISTORY_KEYS}
    state, it0, elapsed0 = resume_state(ckpt, resume, n_tot, "lm", tracker, rng, hist)
    if state is not None:
        shape = (n_tot, n_par)
        theta0 = state_array(state, "theta", shape, dtype, ckpt.path)
        best_theta = state_array(state, "best_theta", shape, dtype, ckpt.path)
        lam0 = state_array(state, "lam", (n_tot,), dtype, ckpt.path)
    row = NamedSharding(mesh, PS("pix"))
    row2 = NamedSharding(mesh, PS("pix", None))
    theta = [
        jax.device_put(theta0[c * chunk : (c + 1) * chunk], row2)
        for c in range(len(chunks))
    ]
    lam = [
        jax.device_put(lam0[c * chunk : (c + 1) * chunk], row)
        for c in range(len(chunks))
    ]

    def save(it):
        ckpt.save(
            it,
            {
                "theta": np.concatenate([np.asarray(t) for t in theta]),
                "lam": np.concatenate([np.asarray(v) for v in lam]),
                "best_theta": best_theta,
            },
            tracker,
            hist,
            rng,
            elapsed0 + time.perf_counter() - t0,
        )

    t0 = time.perf_counter()
    bar = tqdm(
        range(it0, max(cfg.max_iter, it0)),
        desc=f"LM training {n_pix} px x {n_par} params",
        disable=not progress,
        unit="it",
        initial=it0,
        total=cfg.max_iter,
    )
    it = it0
    for it in bar:
        if not tracker.active.any():
            break
        train_loss, val_mse, val_mae = _lm_sweep(
            theta, lam, data, chunks, chunk, tracker.active, kw
        )
        _check_divergence(
            it, cfg, tracker, train_loss, val_mse, ref_mse, n_pix, train.wavelength,
            ckpt, "lm",
        )  # fmt: skip
        # Frozen pixels keep their best values; only active ones can improve.
        val_mse = np.where(tracker.active, val_mse, np.inf)
        better = tracker.update(val_mse, val_mae)
        if better.any():
            for c in np.unique(np.nonzero(better)[0] // chunk):
                sl = slice(c * chunk, (c + 1) * chunk)
                th = np.asarray(theta[c])
                m = better[sl]
                best_theta[sl][m] = th[m]
        restart = tracker.to_restart()
        if restart.any():
            _restart_lm_pixels(
                restart, theta, lam, tracker, rng, wmean, n_lab, cfg, dtype, chunk,
                (row2, row),
            )  # fmt: skip
        tracker.retire()
        real = slice(0, n_pix)
        act = tracker.active[real]
        hist["train_rms"].append(
            float(np.sqrt(np.median(train_loss[real] / max(train.n_spec, 1))))
        )
        hist["valid_rms"].append(float(np.sqrt(np.median(tracker.best[real]))))
        hist["valid_mae"].append(float(np.median(tracker.best_mae[real])))
        hist["n_active"].append(int(act.sum()))
        hist["n_restarted"].append(int((tracker.restarts[real] > 0).sum()))
        hist["seconds"].append(elapsed0 + time.perf_counter() - t0)
        bar.set_postfix(valid_rms=f"{hist['valid_rms'][-1]:.2e}", active=int(act.sum()))
        if ckpt is not None and (it + 1) % ckpt.every == 0:
            save(it + 1)
        if not tracker.active.any():
            break
    bar.close()
    if ckpt is not None and ckpt.last_iteration != len(hist["valid_rms"]):
        save(len(hist["valid_rms"]))
    return (
        best_theta[:n_pix],
        unravel,
        tracker,
        {k: np.asarray(v) for k, v in hist.items()},
    )


def _train_adam(
    train, valid, lo, hi, cfg, dtype, progress, *, ckpt=None, resume=False, init=None
):
    data, chunks, idx, chunk, mesh = _prepare(train, valid, lo, hi, cfg, dtype)
    n_pix, n_lab, n_tot = train.n_pix, train.n_labels, idx.size
    unravel, rng, wmean, theta0 = _start(data, n_lab, cfg, idx, dtype, init)
    kw = dict(unravel=unravel, activation=cfg.activation)
    ref_mse = _ref_mse(theta0, data, chunks, chunk, kw)
    row2 = NamedSharding(mesh, PS("pix", None))
    theta = jax.device_put(theta0, row2)
    y_t = jax.device_put(data["y_t"], row2)
    sw_t = jax.device_put(data["sw_t"], row2)
    opt = optax.adam(cfg.learning_rate)
    opt_state = opt.init(theta)
    step = make_adam_step(opt, unravel, cfg.activation)

    n_train = train.n_spec
    bs = min(cfg.batch_size, n_train)
    best_theta = theta0.copy()
    tracker = _PixelTracker(n_tot, cfg)
    hist = {k: [] for k in _HISTORY_KEYS}
    state, it0, elapsed0 = resume_state(ckpt, resume, n_tot, "adam", tracker, rng, hist)
    if state is not None:
        shape = theta0.shape
        theta = jax.device_put(
            state_array(state, "theta", shape, dtype, ckpt.path), row2
        )
        best_theta = state_array(state, "best_theta", shape, dtype, ckpt.path)
        leaves, treedef = jax.tree_util.tree_flatten(opt_state)
        opt_state = jax.tree_util.tree_unflatten(
            treedef,
            [
                jax.device_put(
                    state_array(state, f"opt_{i}", leaf.shape, leaf.dtype, ckpt.path),
                    leaf.sharding,
                )
                for i, leaf in enumerate(leaves)
            ],
        )

    def save(it):
        leaves = jax.tree_util.tree_leaves(opt_state)
        ckpt.save(
            it,
            {
                "theta": np.asarray(theta),
                "best_theta": best_theta,
                **{f"opt_{i}": np.asarray(v) for i, v in enumerate(leaves)},
            },
            tracker,
            hist,
            rng,
            elapsed0 + time.perf_counter() - t0,
        )

    t0 = time.perf_counter()
    bar = tqdm(
        range(it0, max(cfg.max_iter, it0)),
        desc=f"Adam training {n_pix} px",
        unit="epoch",
        disable=not progress,
        initial=it0,
        total=cfg.max_iter,
    )
    for it in bar:
        if not tracker.active.any():
            break
        perm = rng.permutation(n_train)
        losses = []
        for b in range(n_train // bs):  # fixed-size batches: one compilation
            sel = jnp.asarray(perm[b * bs : (b + 1) * bs])
            theta, opt_state, loss = step(
                theta, opt_state, data["s_t"][sel], y_t[:, sel], sw_t[:, sel]
            )
            losses.append(loss)
        train_loss = np.mean(np.asarray(jnp.stack(losses)), axis=0)  # (n_tot,)
        val_mse, val_mae = np.empty(n_tot), np.empty(n_tot)
        th_np = np.asarray(theta)
        for c, ch in enumerate(chunks):
            sl = slice(c * chunk, (c + 1) * chunk)
            mse, _, mae = valid_stats(
                jnp.asarray(th_np[sl]), data["s_v"], ch["y_v"], ch["sw_v"], **kw
            )
            val_mse[sl], val_mae[sl] = np.asarray(mse), np.asarray(mae)
        _check_divergence(
            it, cfg, tracker, train_loss, val_mse, ref_mse, n_pix, train.wavelength,
            ckpt, "adam",
        )  # fmt: skip
        val_mse = np.where(tracker.active, val_mse, np.inf)
        better = tracker.update(val_mse, val_mae)
        best_theta[better] = th_np[better]
        tracker.retire()
        real = slice(0, n_pix)
        hist["train_rms"].append(float(np.sqrt(np.sum(train_loss[real]) / n_pix)))
        hist["valid_rms"].append(float(np.sqrt(np.median(tracker.best[real]))))
        hist["valid_mae"].append(float(np.median(tracker.best_mae[real])))
        hist["n_active"].append(int(tracker.active[real].sum()))
        hist["n_restarted"].append(0)
        hist["seconds"].append(elapsed0 + time.perf_counter() - t0)
        bar.set_postfix(valid_rms=f"{hist['valid_rms'][-1]:.2e}")
        if ckpt is not None and (it + 1) % ckpt.every == 0:
            save(it + 1)
        if not tracker.active.any():
            break
    bar.close()
    if ckpt is not None and ckpt.last_iteration != len(hist["valid_rms"]):
        save(len(hist["valid_rms"]))
    return (
        best_theta[:n_pix],
        unravel,
        tracker,
        {k: np.asarray(v) for k, v in hist.items()},
    )
