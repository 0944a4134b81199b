"""Active learning of grid points: synthesize new spectra where the emulator is worst.

Training grids from physical codes cost minutes to hours per spectrum, so where the next
spectra go matters. :func:`active_learning` grows a grid in rounds:

1. train an emulator on the current grid, holding out a *probe* share
   (``probe_fraction``) of the starting grid and of every batch, for early stopping
   and as the error map's data; a batch's probes are uniform draws in the box, so
   that they measure the error where the test stars are (a box-wide median), not where
   the batch went;
2. measure the emulator's error on each probe spectrum (mean absolute error over
   pixels: out of sample, since probes are never trained on) and regress its logarithm
   over the label box by inverse-distance weighting of the ``n_neighbours`` nearest
   probes: the predicted error ``e(x)``;
3. propose the batch's training labels by a greedy *weighted maximin* over uniform
   candidates (unit-box coordinates): pick the candidate that maximises
   ``e(x) ** (exponent / L) * d(x)``, ``d`` its distance to the nearest training label
   or earlier pick, or 4 times its distance to the nearest face of the box if smaller
   (``_WALL_FACTOR``), ``L`` the number of labels. Picks then end up spaced as
   ``1 / e ** (exponent / L)``: a density proportional to ``e ** exponent``.
   ``exponent`` 0 is a space-filling design, large exponents pile the batch where the
   error is largest. Without the faces a maximin piles its picks on them; with twice
   the distance (a mirror image) it leaves a layer of half a spacing along them empty,
   most of a 5-dimensional box's volume and where the worst spectra are; with 4 the
   picks come to about a quarter spacing from them;
4. synthesize it with the user's callable, append it, and retrain from the current
   parameters (warm start, ``refine_iter`` iterations).

``strategy="error"`` is :class:`ErrorMap` with its defaults (``exponent`` 0.5);
``strategy="space"`` is the same design without the error map (exponent 0: the
emulator's uncertainty taken as growing with the distance to the nearest training
label, as a Gaussian process's does), and ``strategy="random"`` draws every batch
uniformly (the control: same loop, probes and warm starts). The learning curve records,
per round, the grid size and the held-out errors (the probes', and a separate ``test``
grid's when given).

Why a tempered exponent: an untempered map (the first version ranked candidates by the
error times a spacing factor capped at 1: a density ~ ``e ** L``) sends every batch to
the hardest corners, the networks' capacity goes there, and the box-wide median error
rises. For a local approximation of order ``p`` the mean absolute error is smallest at
a density ~ ``c ** (L / (L + p))``, ``c`` the local difficulty; as the measured error
already falls where the grid is dense, exponent 1 settles near it. The median asks for
less tilt: 0.5 (docs/benchmarks.md, issue 19).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable

import numpy as np
from scipy.spatial import cKDTree

from ..grid import SpectralGrid
from ._emulator import Emulator
from ._train import TrainConfig, train_emulator

log = logging.getLogger("payne_lite.emulator")

#: A candidate's distance to the grid is at most this many times its distance to the
#: nearest face of the box (2: to its mirror image; see the module doc).
_WALL_FACTOR = 4.0
#: Strategies of :func:`active_learning`.
ACTIVE_STRATEGIES = ("error", "space", "random")
#: Entries of :attr:`ActiveLearningResult.curve`.
CURVE_KEYS = (
    "n_spec",
    "n_train",
    "probe_median_abs_error",
    "test_median_abs_error",
    "test_p90_spectrum_error",
    "train_seconds",
    "n_iter",
)


@dataclasses.dataclass(frozen=True)
class ErrorMap:
    """The ``"error"`` strategy of :func:`active_learning` with its settings.

    Attributes:
        exponent: the training labels tend to a density proportional to the predicted
            held-out error to this power (0: a space-filling design; large: the batches
            pile up where the error is largest).
        n_neighbours: probes in the inverse-distance-weighted regression of the error.
    """

    exponent: float = 0.5
    n_neighbours: int = 8

    def __post_init__(self):
        if not (np.isfinite(self.exponent) and self.exponent >= 0):
            raise ValueError(f"exponent must be finite and >= 0, got {self.exponent!r}")
        if isinstance(self.n_neighbours, bool) or self.n_neighbours < 1:
            raise ValueError(f"n_neighbours must be >= 1, got {self.n_neighbours!r}")


@dataclasses.dataclass(frozen=True)
class ActiveLearningResult:
    """What :func:`active_learning` returns.

    Attributes:
        grid: every spectrum: the starting grid's rows first, then each batch in order
            (``meta["active_learning"]`` records the settings and the rounds).
        emulator: the last emulator, trained on ``grid[~probe]`` and stopped early
            on ``grid[probe]``.
        probe: (n_spec,) bool, the held-out rows (never trained on).
        curve: per round (R,) arrays: ``n_spec`` (grid size), ``n_train``,
            ``probe_median_abs_error`` (median absolute error over probe spectra and pixels),
            ``test_median_abs_error`` (the same on ``test``; NaN without it),
            ``test_p90_spectrum_error`` (90th percentile over ``test`` spectra of
            their mean absolute error over pixels: the tail; NaN without ``test``),
            ``train_seconds`` and ``n_iter`` (iterations of that round's training).
    """

    grid: SpectralGrid
    emulator: Emulator
    probe: np.ndarray
    curve: dict[str, np.ndarray]


def _check_args(grid, synthesize, n_total, batch_size, strategy, test, probe_fraction):
    """Check the settings; return the strategy, "error" as an :class:`ErrorMap`."""
    if not isinstance(grid, SpectralGrid):
        raise TypeError(f"grid must be a SpectralGrid, got {type(grid).__name__}")
    if not callable(synthesize):
        raise TypeError(f"synthesize must be callable, got {type(synthesize).__name__}")
    if grid.flux_err is not None:
        raise ValueError(
            "grid has flux_err; active learning grows noise-free synthetic grids only"
        )
    for name, v in (("n_total", n_total), ("batch_size", batch_size)):
        if isinstance(v, bool) or int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if n_total < grid.n_spec:
        raise ValueError(f"n_total={n_total} is below the grid's {grid.n_spec} spectra")
    if not isinstance(strategy, ErrorMap) and strategy not in ACTIVE_STRATEGIES:
        raise ValueError(
            f"strategy must be one of {ACTIVE_STRATEGIES} or an ErrorMap, "
            f"got {strategy!r}"
        )
    if not 0.0 <= probe_fraction < 1.0:
        raise ValueError(f"probe_fraction must be in [0, 1), got {probe_fraction!r}")
    if test is not None and (
        test.n_pix != grid.n_pix or tuple(test.label_names) != tuple(grid.label_names)
    ):
        raise ValueError("test grid has other pixels or labels than grid")
    return ErrorMap() if strategy == "error" else strategy


def _synthesize(synthesize, labels: np.ndarray, n_pix: int) -> np.ndarray:
    """Call the user's synthesizer and check its answer (n, n_pix), finite."""
    flux = np.asarray(synthesize(labels), dtype=np.float32)
    if flux.shape != (labels.shape[0], n_pix):
        raise ValueError(
            f"synthesize returned shape {flux.shape} for {labels.shape[0]} label "
            f"vectors; expected ({labels.shape[0]}, {n_pix})"
        )
    if not np.all(np.isfinite(flux)):
        bad = int(np.argmax(~np.all(np.isfinite(flux), axis=1)))
        raise ValueError(
            f"synthesize returned non-finite flux for labels {labels[bad].tolist()}"
        )
    return flux


def spectrum_errors(emulator: Emulator, grid: SpectralGrid) -> np.ndarray:
    """Each spectrum's mean absolute error (emulated - true flux) over its pixels,
    for the spectra of ``grid`` (n_spec,)."""
    pred = np.asarray(emulator.predict(grid.labels, allow_outside=True))
    return np.mean(np.abs(pred - grid.flux), axis=1)


def propose_labels(
    labels: np.ndarray,
    probe_labels: np.ndarray,
    probe_errors: np.ndarray | None,
    box: tuple[np.ndarray, np.ndarray],
    n: int,
    *,
    rng: np.random.Generator,
    exponent: float = 0.5,
    n_candidates: int = 20000,
    n_neighbours: int = 8,
) -> np.ndarray:
    """New labels by a greedy weighted maximin (see the module doc): where the grid's
    holes, weighted by the regressed held-out error, are largest.

    Args:
        labels: (N, L) labels already in the grid [physical units].
        probe_labels: (M, L) held-out labels whose errors are known.
        probe_errors: (M,) their errors (positive; their log is regressed); None:
            no weights, a plain (boundary-corrected) maximin design.
        box: (lo, hi), each (L,): the label box.
        n: how many to propose.
        rng: the random generator (the candidates).
        exponent: the picks tend to a density proportional to the predicted error to
            this power (0: uniform).
        n_candidates: uniform candidates scored.
        n_neighbours: probes in the inverse-distance-weighted regression.

    Returns:
        (n, L) labels inside the box.
    """
    lo, hi = (np.asarray(b, np.float64) for b in box)
    unit = lambda x: (np.asarray(x, np.float64) - lo) / (hi - lo)  # noqa: E731
    cand = rng.random((n_candidates, lo.size))
    # a candidate's distance to the grid, capped by its distance to the nearest face
    # (scaled): without the cap a maximin piles its picks on the box's faces
    d_wall = _WALL_FACTOR * np.minimum(cand, 1.0 - cand).min(axis=1)
    d_near = np.minimum(cKDTree(unit(labels)).query(cand)[0], d_wall)
    weight = np.ones(n_candidates)
    if probe_errors is not None and exponent != 0.0:
        k = min(n_neighbours, len(probe_errors))
        dist, idx = cKDTree(unit(probe_labels)).query(cand, k=k)
        dist, idx = dist.reshape(n_candidates, k), idx.reshape(n_candidates, k)
        w = 1.0 / np.maximum(dist, 1e-9) ** 2
        log_err = np.log(np.maximum(probe_errors, 1e-30))[idx]
        # weight x distance is maximised: picks end up spaced ~ 1 / weight, a density
        # ~ weight ** L = error ** exponent
        weight = np.exp(exponent / lo.size * np.sum(w * log_err, 1) / np.sum(w, 1))
    picks = []
    for _ in range(n):
        j = int(np.argmax(weight * d_near))
        picks.append(j)
        d_near = np.minimum(d_near, np.linalg.norm(cand - cand[j], axis=1))
    return np.clip(lo + cand[picks] * (hi - lo), lo, hi)


def _train_round(grid, probe, init, refine_iter, train_kw):
    kw = dict(train_kw)
    if init is not None:
        kw["max_iter"] = refine_iter
    t0 = time.perf_counter()
    emu = train_emulator(
        grid.subset(np.nonzero(~probe)[0]),
        valid=grid.subset(np.nonzero(probe)[0]),
        init=init,
        **kw,
    )
    return emu, time.perf_counter() - t0


def _held_out_errors(emulator: Emulator, grid: SpectralGrid) -> tuple[float, float]:
    """Median absolute error over spectra and pixels, and the 90th percentile over spectra
    of each spectrum's mean absolute error."""
    err = np.abs(
        np.asarray(emulator.predict(grid.labels, allow_outside=True)) - grid.flux
    )
    return float(np.median(err)), float(np.percentile(err.mean(axis=1), 90))


def active_learning(
    grid: SpectralGrid,
    synthesize: Callable[[np.ndarray], np.ndarray],
    *,
    n_total: int,
    batch_size: int = 200,
    strategy: str | ErrorMap = "error",
    test: SpectralGrid | None = None,
    probe_fraction: float = 0.2,
    warm_start: bool = True,
    refine_iter: int = 60,
    n_candidates: int = 20000,
    seed: int = 0,
    config: TrainConfig | None = None,
    progress: bool = False,
    **overrides,
) -> ActiveLearningResult:
    """Grow a training grid where the emulator is least accurate, retraining as it grows.

    Args:
        grid: the starting grid (for example a small Latin hypercube); its design box
            (``grid.label_box``) bounds the new labels.
        synthesize: ``labels (n, L) -> flux (n, n_pix)`` on ``grid.wavelength``, labels
            in ``grid.label_names`` order [physical units]; e.g. a wrapper of
            :func:`payne_lite.grid.synth.synthesize`, or of Korg / Turbospectrum.
        n_total: stop when the grid holds this many spectra (starting grid included).
        batch_size: new spectra per round (the last round may be smaller).
        strategy: ``"error"`` (the error map with its default settings, see the
            module doc), an :class:`ErrorMap` (other settings), ``"space"`` (fill the
            grid's largest holes) or ``"random"`` (uniform draws; the control).
        test: an optional held-out grid on the same pixels: its median absolute error is
            recorded each round (not used to choose labels).
        probe_fraction: share of the starting grid (a random subset) and of each batch
            (uniform draws) held out.
        warm_start: retrain each round from the last parameters (``refine_iter``
            iterations); otherwise from scratch with ``config.max_iter``.
        refine_iter: LM iterations (Adam epochs) of a warm-started round.
        n_candidates: uniform candidates scored per round.
        seed: seed of the probe draws, the candidates and, unless ``config`` or
            ``overrides`` set it, of training.
        config: training settings (:class:`TrainConfig`); ``overrides`` replace
            fields of it, e.g. ``hidden=10``.
        progress: show training progress bars.

    Returns:
        An :class:`ActiveLearningResult`: the grown grid, the last emulator, the probe
        mask and the learning curve.

    Raises:
        ValueError: bad settings; a synthesizer answer of the wrong shape or with
            non-finite flux (naming the labels).
        TypeError: ``grid`` not a :class:`SpectralGrid` or ``synthesize`` not callable.

    Examples:
        >>> from payne_lite.grid import synth                   # doctest: +SKIP
        >>> wave = synth.default_wavelength()[:200]              # doctest: +SKIP
        >>> start = synth.make_grid(400, wavelength=wave)        # doctest: +SKIP
        >>> run = active_learning(                               # doctest: +SKIP
        ...     start, lambda x: synth.synthesize(x, wavelength=wave), n_total=1000)
        >>> run.curve["n_spec"], run.emulator                    # doctest: +SKIP
    """
    strategy = _check_args(grid, synthesize, n_total, batch_size, strategy, test,
                           probe_fraction)  # fmt: skip
    rng = np.random.default_rng(seed)
    overrides.setdefault("seed", seed)
    train_kw = dict(config=config, progress=progress, **overrides)
    lo, hi = box = grid.label_box

    def uniform(m: int) -> np.ndarray:
        return lo + rng.random((m, lo.size)) * (hi - lo)

    def n_probe(m: int) -> int:
        return min(m, max(1, int(round(probe_fraction * m))))

    labels, flux = np.asarray(grid.labels, np.float64), np.asarray(grid.flux)
    probe = np.zeros(grid.n_spec, bool)
    probe[rng.permutation(grid.n_spec)[: n_probe(grid.n_spec)]] = True
    emu, secs = _train_round(grid, probe, None, refine_iter, train_kw)
    curve = {k: [] for k in CURVE_KEYS}

    def record(g, secs):
        curve["n_spec"].append(g.n_spec)
        curve["n_train"].append(int((~probe).sum()))
        curve["probe_median_abs_error"].append(
            _held_out_errors(emu, g.subset(np.nonzero(probe)[0]))[0]
        )
        med, p90 = (np.nan, np.nan) if test is None else _held_out_errors(emu, test)
        curve["test_median_abs_error"].append(med)
        curve["test_p90_spectrum_error"].append(p90)
        curve["train_seconds"].append(secs)
        curve["n_iter"].append(len(emu.history["valid_rms"]))
        log.info(
            "active learning: %d spectra, probe median |err| %.3e, test %.3e, %.1f s",
            g.n_spec, curve["probe_median_abs_error"][-1], med, secs,
        )  # fmt: skip

    record(grid, secs)
    while labels.shape[0] < n_total:
        n = min(batch_size, n_total - labels.shape[0])
        m = n - n_probe(n)  # training spectra; the probes are uniform draws
        if strategy == "random" or m == 0:
            new = uniform(m)
        else:
            p, t = np.nonzero(probe)[0], np.nonzero(~probe)[0]
            err, exponent, k = None, 0.0, 1
            if isinstance(strategy, ErrorMap):
                err = spectrum_errors(
                    emu, SpectralGrid(**_fields(grid, labels[p], flux[p]))
                )
                exponent, k = strategy.exponent, strategy.n_neighbours
            new = propose_labels(
                labels[t], labels[p], err, box, m, rng=rng, exponent=exponent,
                n_candidates=n_candidates, n_neighbours=k,
            )  # fmt: skip
        new = np.concatenate([new, uniform(n - m)])
        labels = np.concatenate([labels, new])
        flux = np.concatenate([flux, _synthesize(synthesize, new, grid.n_pix)])
        probe = np.concatenate([probe, np.arange(n) >= m])
        grown = SpectralGrid(**_fields(grid, labels, flux))
        emu, secs = _train_round(grown, probe, emu if warm_start else None,
                                 refine_iter, train_kw)  # fmt: skip
        record(grown, secs)
    settings = dict(strategy=str(strategy), batch_size=batch_size, seed=seed,
                    probe_fraction=probe_fraction, warm_start=warm_start,
                    refine_iter=refine_iter, n_start=grid.n_spec)  # fmt: skip
    meta = {**grid.meta, "active_learning": settings}
    out = SpectralGrid(**_fields(grid, labels, flux, meta))
    curve = {k: np.asarray(v) for k, v in curve.items()}
    return ActiveLearningResult(grid=out, emulator=emu, probe=probe, curve=curve)


def _fields(grid: SpectralGrid, labels, flux, meta=None) -> dict:
    """Constructor fields of a grid like ``grid`` with other labels and flux."""
    return dict(
        wavelength=grid.wavelength,
        labels=labels,
        flux=flux,
        label_names=grid.label_names,
        label_units=grid.label_units,
        meta=grid.meta if meta is None else meta,
        box=grid.label_box,
    )
