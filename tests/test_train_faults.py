"""Training faults and checkpoints (issue 8, item 5), and the GPU-node recipe (item 3).

* a NaN or exploding loss stops LM and Adam runs with TrainingDivergedError, and the
  checkpoint written before it is kept (and resumable);
* a run stopped after k iterations (or killed) and resumed from its checkpoint ends
  with the parameters and loss curves of an uninterrupted run;
* a checkpoint of another config, grid, optimiser or format is refused;
* training/train_gpu.sbatch's command line and gpu_node.json parse with today's CLI,
  and run through it on a tiny grid with 4 simulated CPU devices.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import restamp
from test_train import _teacher_grid

import payne_lite as pl
from payne_lite.cli import build_parser, main
from payne_lite.cli._cli import _CONFIG_FIELDS, _config_from_json
from payne_lite.emulator import _train as T

ROOT = Path(__file__).resolve().parents[1]
# small, with retirements and restarts (both use the saved bookkeeping and RNG)
KW = dict(hidden=3, pixel_batch=8, progress=False, patience=3, restart_threshold=1.01)


@pytest.fixture(scope="module")
def grid():
    return _teacher_grid(n_spec=90, n_pix=21)[0]


@pytest.fixture(scope="module")
def uninterrupted(grid):
    """12-iteration runs without checkpoints, per optimiser."""
    return {
        opt: pl.train_emulator(grid, max_iter=12, optimizer=opt, **KW)
        for opt in ("lm", "adam")
    }


def _params(emu):
    return [np.asarray(a) for a in emu.net.weights + emu.net.biases]


def assert_same_run(a, b):
    for x, y in zip(_params(a), _params(b), strict=True):
        np.testing.assert_array_equal(x, y)
    for key in a.history:
        if key != "seconds":
            np.testing.assert_array_equal(a.history[key], b.history[key], err_msg=key)
    np.testing.assert_array_equal(a.pixel_error, b.pixel_error)


def _iteration(path) -> int:
    with h5py.File(path, "r") as f:
        return int(f.attrs["iteration"])


# --------------------------------------------------------------------------------------
# resume
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["lm", "adam"])
def test_stop_and_resume_equals_uninterrupted(grid, uninterrupted, tmp_path, optimizer):
    ckpt = tmp_path / "ckpt.h5"
    short = pl.train_emulator(
        grid, max_iter=5, optimizer=optimizer, checkpoint=ckpt, checkpoint_every=2, **KW
    )
    assert _iteration(ckpt) == len(short.history["valid_rms"]) == 5
    if optimizer == "lm":  # payne-lite info describes the checkpoint
        from payne_lite.cli import main

        assert main(["info", str(ckpt)]) == 0
    resumed = pl.train_emulator(
        grid, max_iter=12, optimizer=optimizer, checkpoint=ckpt, resume=True, **KW
    )
    assert_same_run(resumed, uninterrupted[optimizer])
    assert _iteration(ckpt) == 12


@pytest.mark.parametrize("optimizer", ["lm", "adam"])
def test_killed_run_resumes_to_the_uninterrupted_result(
    grid, uninterrupted, tmp_path, monkeypatch, optimizer
):
    """A KeyboardInterrupt in the middle of iteration 7 (any kill) leaves the
    checkpoint of iteration 6; resuming from it gives the uninterrupted run."""
    ckpt = tmp_path / "ckpt.h5"
    calls = {"n": 0}
    if optimizer == "lm":
        real = T.lm_step

        def step(*a, **k):
            calls["n"] += 1
            if calls["n"] == 6 * 3 + 2:  # 3 chunks of 8 pixels per iteration
                raise KeyboardInterrupt
            return real(*a, **k)

        monkeypatch.setattr(T, "lm_step", step)
    else:
        real_make = T.make_adam_step

        def make(*a, **k):
            real = real_make(*a, **k)

            def step(*args):
                calls["n"] += 1
                if calls["n"] == 6 * 1 + 1:  # one batch of 72 spectra per epoch
                    raise KeyboardInterrupt
                return real(*args)

            return step

        monkeypatch.setattr(T, "make_adam_step", make)
    with pytest.raises(KeyboardInterrupt):
        pl.train_emulator(
            grid, max_iter=12, optimizer=optimizer, checkpoint=ckpt, checkpoint_every=3,
            **KW,
        )  # fmt: skip
    assert _iteration(ckpt) == 6
    monkeypatch.undo()
    resumed = pl.train_emulator(
        grid, max_iter=12, optimizer=optimizer, checkpoint=ckpt, resume=True, **KW
    )
    assert_same_run(resumed, uninterrupted[optimizer])


def test_resume_without_a_checkpoint_file_starts_afresh(grid, uninterrupted, tmp_path):
    """resume=True on a missing file trains from scratch (a requeued job's first run)."""
    emu = pl.train_emulator(
        grid, max_iter=12, checkpoint=tmp_path / "new.h5", resume=True, **KW
    )
    assert_same_run(emu, uninterrupted["lm"])


# --------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("optimizer", ["lm", "adam"])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    grid, uninterrupted, tmp_path, monkeypatch, optimizer
):
    ckpt = tmp_path / "ckpt.h5"
    calls = {"n": 0}
    if optimizer == "lm":
        real = T.lm_step
        nan_from = 4 * 3 + 1  # iteration 5, first chunk

        def step(*a, **k):
            calls["n"] += 1
            theta, lam, loss = real(*a, **k)
            if calls["n"] >= nan_from:
                return theta * np.nan, lam, loss * np.nan
            return theta, lam, loss

        monkeypatch.setattr(T, "lm_step", step)
    else:
        real_make = T.make_adam_step

        def make(*a, **k):
            real = real_make(*a, **k)

            def step(*args):
                calls["n"] += 1
                theta, state, loss = real(*args)
                if calls["n"] >= 5:  # epoch 5
                    return theta * np.nan, state, loss * np.nan
                return theta, state, loss

            return step

        monkeypatch.setattr(T, "make_adam_step", make)
    msg = (
        rf"^training \({optimizer}\) diverged at iteration 5: non-finite loss for "
        rf"\d+ pixel\(s\), first pixel \d+ at 150\d\d A \(non-finite flux, labels or "
        rf"errors in the grid\?\); the checkpoint {re.escape(str(ckpt))} from "
        rf"iteration 4 is kept$"
    )
    with pytest.raises(pl.TrainingDivergedError, match=msg):
        pl.train_emulator(
            grid, max_iter=12, optimizer=optimizer, checkpoint=ckpt, checkpoint_every=2,
            **KW,
        )  # fmt: skip
    assert _iteration(ckpt) == 4
    with h5py.File(ckpt, "r") as f:
        assert np.all(np.isfinite(f["state/theta"][()]))
    monkeypatch.undo()
    resumed = pl.train_emulator(
        grid, max_iter=12, optimizer=optimizer, checkpoint=ckpt, resume=True, **KW
    )
    assert_same_run(resumed, uninterrupted[optimizer])


def test_exploding_adam_loss_stops_the_run(grid, tmp_path):
    with pytest.raises(
        pl.TrainingDivergedError,
        match=r"^training \(adam\) diverged at iteration 1: median validation RMS "
        r"\S+ is more than divergence_factor=1000 times the starting \S+ \(a "
        r"smaller learning_rate or lm_lambda0\?\); no checkpoint was written to "
        r".*ckpt\.h5 before it$",
    ):
        pl.train_emulator(
            grid, optimizer="adam", learning_rate=1e4, max_iter=5,
            checkpoint=tmp_path / "ckpt.h5", **KW,
        )  # fmt: skip
    assert not (tmp_path / "ckpt.h5").exists()


def test_divergence_without_checkpoint_says_so(grid, monkeypatch):
    real = T.lm_step
    monkeypatch.setattr(
        T,
        "lm_step",
        lambda *a, **k: (lambda r: (r[0], r[1], r[2] * np.inf))(real(*a, **k)),
    )  # noqa: E501
    with pytest.raises(
        pl.TrainingDivergedError,
        match=r"iteration 1: non-finite loss .*; no checkpoint was kept \(pass "
        r"checkpoint=PATH to keep one\)$",
    ):
        pl.train_emulator(grid, max_iter=3, **KW)


def test_divergence_factor_is_validated():
    with pytest.raises(ValueError, match=r"divergence_factor must be > 0, got -1"):
        pl.TrainConfig(divergence_factor=-1)


# --------------------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------------------
@pytest.fixture
def lm_checkpoint(grid, tmp_path):
    ckpt = tmp_path / "ckpt.h5"
    pl.train_emulator(grid, max_iter=2, checkpoint=ckpt, **KW)
    return ckpt


def _other_grid(grid):
    flux = np.array(grid.flux)
    flux[0, 0] += 1e-3
    return pl.SpectralGrid(
        wavelength=grid.wavelength, labels=grid.labels, flux=flux,
        label_names=grid.label_names, label_units=grid.label_units,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("change", "exc", "match"),
    [
        (dict(hidden=4), ValueError,
         r"written by another training run: config\.hidden: \[3\] in the checkpoint, "
         r"\[4\] now \(use a new checkpoint path"),
        (dict(optimizer="adam"), ValueError, r"config\.optimizer: 'lm' in the "
         r"checkpoint, 'adam' now"),
        (dict(seed=1), ValueError, r"config\.seed: 0 in the checkpoint, 1 now"),
        (dict(grid=_other_grid), ValueError,
         r"train_grid_sha256: another grid in the checkpoint"),
        (dict(pixel_batch=16), ValueError, r"config\.pixel_batch: 8 in the checkpoint, "
         r"16 now"),
        (dict(resume=False), FileExistsError,
         r"checkpoint .*ckpt\.h5 exists; pass resume=True \(payne-lite train "
         r"--resume\) to continue from it, or remove it"),
    ],
    ids=["hidden", "optimizer", "seed", "grid", "pixel_batch", "no-resume"],
)  # fmt: skip
def test_mismatched_checkpoint_is_refused(grid, lm_checkpoint, change, exc, match):
    kw = {**KW, "max_iter": 4, "checkpoint": lm_checkpoint, "resume": True}
    g = grid
    for key, value in change.items():
        if key == "grid":
            g = value(grid)
        else:
            kw[key] = value
    before = lm_checkpoint.read_bytes()
    with pytest.raises(exc, match=match):
        pl.train_emulator(g, **kw)
    assert lm_checkpoint.read_bytes() == before  # left as it was


@pytest.mark.parametrize("damage", ["truncated", "v2", "other_format"])
def test_damaged_checkpoint_is_refused(grid, lm_checkpoint, damage):
    raw = lm_checkpoint.read_bytes()
    if damage == "truncated":
        lm_checkpoint.write_bytes(raw[: len(raw) // 2])
        match = r"corrupt or truncated"
    else:
        with h5py.File(lm_checkpoint, "a") as f:
            if damage == "v2":
                f.attrs["format_version"] = 2
                match = r"payne_lite\.TrainCheckpoint format_version=2 is not supported"
            else:
                f.attrs["format"] = "payne_lite.Emulator"
                match = r"expected a 'payne_lite\.TrainCheckpoint' file"
        restamp(lm_checkpoint)  # a well-formed file of another version or kind
    with pytest.raises(pl.FileFormatError, match=match):
        pl.train_emulator(grid, max_iter=4, checkpoint=lm_checkpoint, resume=True, **KW)


def test_resume_needs_a_checkpoint(grid):
    with pytest.raises(ValueError, match=r"resume=True needs checkpoint=PATH"):
        pl.train_emulator(grid, max_iter=2, resume=True, **KW)


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
def _main(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def test_cli_checkpoint_resume_and_divergence(grid, tmp_path):
    grid.save(tmp_path / "grid.h5")
    flags = ["--hidden", "3", "--pixel-batch", "8", "--patience", "3", "--no-progress"]
    ckpt = tmp_path / "emu.ckpt.h5"
    code, _, err = _main(
        "train",
        tmp_path / "grid.h5",
        "-o",
        tmp_path / "a.h5",
        "--max-iter",
        "4",
        "--checkpoint",
        ckpt,
        *flags,
    )
    assert code == 0, err
    assert _iteration(ckpt) == 4
    code, out, err = _main(
        "train",
        tmp_path / "grid.h5",
        "-o",
        tmp_path / "b.h5",
        "--max-iter",
        "8",
        "--checkpoint",
        ckpt,
        *flags,
    )
    assert code == 2 and out == ""
    assert err.strip() == (
        f"payne-lite: error: checkpoint {ckpt} exists; add --resume "
        "to continue from it, or remove it"
    )
    code, _, err = _main(
        "train",
        tmp_path / "grid.h5",
        "-o",
        tmp_path / "b.h5",
        "--max-iter",
        "8",
        "--checkpoint",
        ckpt,
        "--resume",
        *flags,
    )
    assert code == 0, err
    direct = pl.train_emulator(
        grid, max_iter=8, hidden=3, pixel_batch=8, patience=3, progress=False
    )
    for x, y in zip(
        _params(pl.Emulator.load(tmp_path / "b.h5")), _params(direct), strict=True
    ):
        np.testing.assert_array_equal(x, y)
    code, out, err = _main(
        "train",
        tmp_path / "grid.h5",
        "-o",
        tmp_path / "c.h5",
        "--optimizer",
        "adam",
        "--learning-rate",
        "1e4",
        *flags,
    )
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "payne-lite: error: training (adam) diverged at iteration 1: median validation"
    ), err
    assert not (tmp_path / "c.h5").exists()


# --------------------------------------------------------------------------------------
# the GPU-node recipe (training/)
# --------------------------------------------------------------------------------------
def _recipe_argv(subs: dict) -> list[str]:
    """The sbatch script's ``payne-lite`` arguments, its shell variables replaced."""
    script = (ROOT / "training" / "train_gpu.sbatch").read_text()
    joined = re.sub(r"\\\n\s*", " ", script)
    cmd = next(
        ln for ln in joined.splitlines() if ln.lstrip().startswith("payne-lite ")
    )
    return [subs.get(a, a) for a in shlex.split(cmd)[1:]]


def test_gpu_recipe_matches_the_cli():
    """The sbatch script's payne-lite command and gpu_node.json parse with today's CLI
    and TrainConfig (a renamed flag or field fails here, not on the cluster)."""
    script = (ROOT / "training" / "train_gpu.sbatch").read_text()
    subs = {
        "$GRID": "grid.h5",
        "$OUT": "emu.h5",
        "$CONFIG": "gpu_node.json",
        "$CKPT": "emu.ckpt.h5",
    }
    args = build_parser().parse_args(_recipe_argv(subs))
    assert args.command == "train"
    assert (args.config, args.checkpoint, args.resume) == (
        "gpu_node.json",
        "emu.ckpt.h5",
        True,
    )
    settings = _config_from_json(ROOT / "training" / "gpu_node.json")
    assert set(settings) <= set(_CONFIG_FIELDS)
    cfg = pl.TrainConfig(**settings)
    assert cfg.pixel_batch == 2048 and cfg.optimizer == "lm"
    readme = (ROOT / "training" / "README.md").read_text()
    for flag in re.findall(r"`(--[a-z-]+)", readme):
        assert flag in script or any(
            flag in a.option_strings for a in _train_actions()
        ), flag


def test_gpu_recipe_runs_on_4_simulated_devices(tmp_path):
    """The sbatch script's command, with training/gpu_node.json, trains a tiny grid
    through the CLI on 4 simulated CPU devices (the pixel axis sharded as on a GPU
    node; 3 iterations instead of 300), writes its checkpoint and a loadable emulator
    whose settings are the recipe's."""
    grid = _teacher_grid(n_spec=60, n_pix=10)[0]
    grid.save(tmp_path / "grid.h5")
    subs = {
        "$GRID": str(tmp_path / "grid.h5"),
        "$OUT": str(tmp_path / "emu.h5"),
        "$CONFIG": str(ROOT / "training" / "gpu_node.json"),
        "$CKPT": str(tmp_path / "emu.ckpt.h5"),
    }
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = (
        env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    )
    argv = [sys.executable, "-m", "payne_lite", *_recipe_argv(subs), "--max-iter", "3"]
    proc = subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    emu = pl.Emulator.load(tmp_path / "emu.h5")
    assert len(emu.meta["devices"]) == 4, emu.meta["devices"]
    recipe = _config_from_json(ROOT / "training" / "gpu_node.json")
    same = set(recipe) - {"hidden", "max_iter"}  # max_iter: 3 given on the command line
    assert {k: emu.meta["config"][k] for k in same} == {k: recipe[k] for k in same}
    assert list(emu.meta["config"]["hidden"]) == [recipe["hidden"]]
    assert len(emu.history["valid_rms"]) == 3
    assert (tmp_path / "emu.ckpt.h5").exists()
    np.testing.assert_array_less(
        np.median(np.abs(emu.predict(grid.labels) - grid.flux)),
        np.median(np.abs(grid.flux - grid.flux.mean(0))),
    )  # better than each pixel's mean after 3 LM iterations


def _train_actions():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["train"]._actions


# --------------------------------------------------------------------------------------
# train_mdn
# --------------------------------------------------------------------------------------
def test_train_mdn_stops_on_a_nan_loss(monkeypatch):
    """A non-finite NLL used to end the run quietly through the patience rule."""
    from conftest import build_tiny_emulator

    from payne_lite.mdn import _train as M  # where train_mdn finds mixture_nll

    real = M.mixture_nll
    monkeypatch.setattr(M, "mixture_nll", lambda *a: real(*a) * np.nan)
    with pytest.raises(
        pl.TrainingDivergedError,
        match=r"^train_mdn diverged at epoch 1: training NLL nan, validation NLL nan "
        r"\(the best so far was inf after 0 epoch\(s\)\); a smaller learning_rate",
    ):
        pl.train_mdn(
            build_tiny_emulator(n_pix=40),
            n_train=200,
            n_valid=40,
            epochs=3,
            n_pca=4,
            hidden=(8,),
            progress=False,
        )
