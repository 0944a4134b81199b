"""Active learning of grid points and the warm start it retrains with (issue 19 part 2)."""

from __future__ import annotations

import numpy as np
import pytest

import payne_lite as pl
from payne_lite.emulator import _active as A
from payne_lite.emulator import active_learning

N_PIX = 6
#: The toy's hard corner: a narrow bump centred at (0.85, 0.85) of the unit box.
CORNER = np.array([0.85, 0.85])


def toy_synth(labels: np.ndarray) -> np.ndarray:
    """Smooth flux everywhere plus a narrow bump near one corner of the unit box."""
    x = np.asarray(labels, np.float64)
    p = np.arange(N_PIX)
    smooth = 0.8 + 0.05 * np.sin(x[:, :1] * 2 + p) * x[:, 1:2]
    bump = 0.15 * np.exp(-np.sum((x - CORNER) ** 2, axis=1) / (2 * 0.08**2))
    return (smooth - bump[:, None] * (1 + 0.1 * p)).astype(np.float32)


def toy_grid(n: int, seed: int) -> pl.SpectralGrid:
    labels = np.random.default_rng(seed).random((n, 2))
    return pl.SpectralGrid(
        wavelength=np.linspace(5000.0, 5001.0, N_PIX),
        labels=labels,
        flux=toy_synth(labels),
        label_names=("x0", "x1"),
        label_units=("", ""),
        box=(np.zeros(2), np.ones(2)),
    )


def _in_corner(labels) -> np.ndarray:
    """The corner x0, x1 > 0.7, 9 % of the box."""
    return np.all(np.asarray(labels) > 0.7, axis=1)


@pytest.fixture(scope="module")
def start():
    return toy_grid(80, seed=0)


@pytest.fixture(scope="module")
def test_grid():
    return toy_grid(200, seed=1)


@pytest.fixture(scope="module")
def run(start, test_grid):
    """One round of 60 new spectra chosen by the error map, its density ~ error**2
    (two trainings)."""
    return active_learning(
        start, toy_synth, strategy=A.ErrorMap(exponent=2.0), n_total=140, batch_size=60,
        test=test_grid, seed=0, hidden=4, max_iter=20, refine_iter=8,
        n_candidates=4000, pixel_batch=8, probe_fraction=0.3,
    )  # fmt: skip


def test_active_learning_grows_the_grid_where_the_error_is_largest(
    run, start, test_grid
):
    """The error map sends the new training labels to the hard corner: over three
    times its area share (9 % of the box, what uniform draws would give); the batch's
    probes are uniform draws. The loop warm-starts and records its learning curve on a
    separate test grid."""
    test = test_grid
    new = run.grid.labels[start.n_spec :]
    assert run.grid.n_spec == 140 and new.shape == (60, 2)
    np.testing.assert_array_equal(run.grid.labels[: start.n_spec], start.labels)
    np.testing.assert_allclose(run.grid.flux, toy_synth(run.grid.labels))
    new_probe = run.probe[start.n_spec :]
    assert new_probe.sum() == 18 and np.all(new_probe[-18:])  # 30 % of 60, last
    share = _in_corner(new[~new_probe]).mean()
    assert share > 3 * 0.09, share  # 0.09: the corner's area share
    c = run.curve
    np.testing.assert_array_equal(c["n_spec"], [80, 140])
    np.testing.assert_array_equal(c["n_iter"] <= [20, 8], True)
    assert run.emulator.meta["warm_start"] and run.emulator.meta["n_train"] == (
        np.sum(~run.probe)
    )
    # the curve's test error is the emulator's own error on the test grid
    err = np.abs(np.asarray(run.emulator.predict(test.labels)) - test.flux)
    np.testing.assert_allclose(c["test_median_abs_error"][-1], np.median(err))
    assert run.grid.meta["active_learning"]["strategy"] == str(A.ErrorMap(2.0))


def _closest(grid, new) -> float:
    """The smallest distance of a new point to another point of grid + new."""
    both = np.concatenate([grid, new])
    d = np.linalg.norm(new[:, None] - both[None], axis=-1)
    d[np.arange(len(new)), len(grid) + np.arange(len(new))] = np.inf
    return float(d.min())


def test_propose_labels_density_follows_the_error_to_the_exponent(monkeypatch):
    """Weighted maximin: with exponent 0 the picks fill the box evenly (about uniform
    draws' share right along its faces, where a plain maximin piles up); with exponent 1
    the quadrant whose probes err 10 times more gets several times its area share,
    more with exponent 2."""
    rng = np.random.default_rng(0)
    box = (np.zeros(2), np.ones(2))
    grid, probes = rng.random((100, 2)), rng.random((400, 2))
    hard = lambda x: np.all(x > 0.5, axis=1)  # noqa: E731
    err = np.where(hard(probes), 10.0, 1.0)

    def propose(exponent, errors=err):
        return A.propose_labels(grid, probes, errors, box, 200, exponent=exponent,
                                rng=np.random.default_rng(1), n_candidates=4000)  # fmt: skip

    def at_face(x):  # within 0.02 of a face: 7.8 % of uniform draws
        return np.mean(np.minimum(x, 1 - x).min(axis=1) < 0.02)

    share = {}
    for e in (0.0, 1.0, 2.0):
        new = propose(e)
        assert new.shape == (200, 2) and np.all((new >= 0) & (new <= 1))
        share[e] = hard(new).mean()
    even = propose(0.0)
    assert at_face(even) < 0.12, at_face(even)
    # and spread out: the closest pair is far apart compared to uniform draws'
    assert _closest(grid, even) > 3 * _closest(grid, rng.random((200, 2)))
    np.testing.assert_array_equal(propose(0.0, None), even)  # no errors: the same
    monkeypatch.setattr(A, "_WALL_FACTOR", np.inf)  # a plain maximin
    assert at_face(propose(0.0)) > 2 * at_face(even)
    assert (
        abs(share[0.0] - 0.25) < 0.05 and share[1.0] > 0.6 and share[2.0] > share[1.0]
    )


def test_warm_start_reproduces_the_init_emulator_in_another_box(run):
    """Parameters moved to a new label box give the same spectra (first layer
    re-scaled exactly); with LM damping so large that no step is taken the warm-
    started emulator equals its start."""
    grid, emu = run.grid, run.emulator
    sub = grid.subset(np.nonzero(np.all(grid.labels < 0.8, axis=1))[0])
    narrow = pl.SpectralGrid(
        wavelength=sub.wavelength,
        labels=sub.labels,
        flux=sub.flux,
        label_names=sub.label_names,
        label_units=sub.label_units,
    )  # no design box: the box is the labels' range, narrower than emu's
    assert np.all(narrow.label_box[1] < emu.label_hi)
    warm = pl.train_emulator(
        narrow, init=emu, hidden=4, max_iter=1, lm_lambda0=1e12, progress=False
    )
    assert warm.meta["warm_start"]
    np.testing.assert_allclose(warm.label_hi, narrow.label_box[1])
    x = narrow.labels
    np.testing.assert_allclose(warm.predict(x), emu.predict(x), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"init emulator has hidden \(4,\)"):
        pl.train_emulator(grid, init=emu, hidden=5, max_iter=1, progress=False)


def test_active_learning_refuses_bad_settings_and_synthesizer_answers():
    start = toy_grid(20, seed=3)
    with pytest.raises(ValueError, match="n_total=10 is below the grid's 20"):
        active_learning(start, toy_synth, n_total=10)
    with pytest.raises(ValueError, match="strategy must be one of"):
        active_learning(start, toy_synth, n_total=30, strategy="ensemble")
    with pytest.raises(ValueError, match="exponent must be finite and >= 0"):
        A.ErrorMap(exponent=-1.0)
    x = np.full((3, 2), 0.5)
    with pytest.raises(ValueError, match=r"synthesize returned shape \(3, 5\)"):
        A._synthesize(lambda x: np.ones((len(x), 5)), x, N_PIX)
    with pytest.raises(ValueError, match=r"non-finite flux for labels \[0.5, 0.5\]"):
        A._synthesize(lambda x: np.full((len(x), N_PIX), np.nan), x, N_PIX)
