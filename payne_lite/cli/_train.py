"""``payne-lite train``: train a per-pixel emulator on a grid (settings from
TrainConfig, a JSON config file and the flags), with checkpoints to resume."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import textwrap
from pathlib import Path

import h5py
import numpy as np

from .. import _h5
from ..emulator import ACTIVATIONS, TrainConfig, train_emulator
from ..grid import SpectralGrid
from ._common import (
    EXIT_OK,
    add_subcommand,
    check_output,
    checked_read,
    positive_int,
    require_file,
)

_log = logging.getLogger("payne_lite.cli")

#: TrainConfig's fields by name: the keys a --config JSON file may hold.
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _cfg_default(name: str):
    default = CONFIG_FIELDS[name].default
    return ",".join(map(str, default)) if isinstance(default, tuple) else default


def _parse_hidden(text: str) -> int | tuple[int, ...]:
    try:
        widths = tuple(int(t) for t in text.replace(" ", "").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a width like 10 or widths like 10,10, got {text!r}"
        ) from None
    return widths[0] if len(widths) == 1 else widths


def add_train(sub) -> None:
    """Declare ``payne-lite train`` in the subparsers ``sub``."""
    p = add_subcommand(
        sub,
        "train",
        help="train a per-pixel emulator on a grid",
        description=(
            "Train a per-pixel neural-network emulator (The Payne, Ting et al. 2019)\n"
            "on a grid of spectra and save it as one HDF5 file. Settings come from\n"
            "the TrainConfig defaults, then --config, then the flags given here.\n"
            "A part of the grid (--valid-fraction) is held out: it decides early\n"
            "stopping and measures the error printed at the end."
        ),
        epilog=(
            "config file: a JSON object whose keys are TrainConfig fields:\n"
            + textwrap.fill(
                ", ".join(CONFIG_FIELDS),
                76,
                initial_indent="  ",
                subsequent_indent="  ",
            )
            + "\n"
            'e.g. {"hidden": [10, 10], "max_iter": 300, "min_improvement": 1e-4}\n\n'
            "examples:\n  payne-lite train grid.h5 -o emulator.h5\n"
            "  payne-lite train grid.h5 -o emu.h5 --hidden 10,10 --max-iter 300\n"
            "  payne-lite train payne_training.npz -o emu.h5 "
            "--label-names Teff,logg,[Fe/H]\n"
            "  payne-lite train payne_zero_spectra/ --labels labels.csv -o emu.h5"
        ),
    )
    p.add_argument(
        "grid",
        metavar="GRID",
        help="training grid: a payne_lite .h5 grid, a training .npz in "
        "The Payne's layout (labels, spectra, wavelength), a folder of Payne "
        "Zero spectrum archives (with --labels), or another .npz / HDF5 file "
        "holding flux, wavelength and labels (names guessed)",
    )
    p.add_argument(
        "--labels",
        metavar="TABLE",
        help="label table of a Payne Zero folder GRID (CSV, ECSV or FITS; a "
        "column 'file' naming each spectrum's archive); without it, each "
        "archive's metadata_json labels",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="EMULATOR.h5",
        help="output HDF5 file (payne_lite.Emulator format)",
    )
    p.add_argument(
        "--config",
        metavar="CONFIG.json",
        help="JSON file of TrainConfig settings (see below); flags given "
        "on the command line override it",
    )
    p.add_argument(
        "--label-names",
        metavar="NAMES",
        help="comma-separated label names for a .npz or foreign HDF5 grid, in "
        "its column order (default label_0, label_1, ...), or the labels to "
        "use of a Payne Zero folder's; payne_lite .h5 grids carry theirs",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show a progress bar"
    )
    _add_checkpoint_options(p)
    _add_config_options(p)


def _add_checkpoint_options(p: argparse.ArgumentParser) -> None:
    """--checkpoint, --checkpoint-every and --resume of ``payne-lite train``."""
    ck = p.add_argument_group("checkpoints (resume a killed or requeued run)")
    ck.add_argument(
        "--checkpoint",
        metavar="CKPT.h5",
        help="write the training state to this file every "
        "--checkpoint-every iterations and at the end (atomically)",
    )
    ck.add_argument(
        "--checkpoint-every",
        type=positive_int,
        default=10,
        metavar="N",
        help="iterations (LM) or epochs (Adam) between checkpoints",
    )
    ck.add_argument(
        "--resume",
        action="store_true",
        help="continue from --checkpoint if it exists (same grid and "
        "settings; --max-iter may grow); without --resume an "
        "existing checkpoint is refused",
    )


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field that the command line sets (--hidden, ...).

    Their default is SUPPRESS, so that only the flags given override --config; the
    help shows TrainConfig's default.
    """
    cfg = p.add_argument_group(
        "training settings (TrainConfig fields; defaults shown are TrainConfig's)"
    )
    sup = argparse.SUPPRESS  # absent flags do not override --config

    def add(flag, name, help, **kw):
        cfg.add_argument(
            flag,
            dest=name,
            default=sup,
            help=f"{help} (default: {_cfg_default(name)})",
            **kw,
        )

    add(
        "--hidden",
        "hidden",
        "hidden-layer width(s) of each pixel's network: 10 "
        "for one layer, 10,10 for two",
        type=_parse_hidden,
        metavar="H[,H...]",
    )
    add(
        "--activation",
        "activation",
        "activation of the hidden units",
        choices=sorted(ACTIVATIONS),
    )
    add(
        "--optimizer",
        "optimizer",
        "lm = Levenberg-Marquardt on all spectra "
        "(second order, few iterations), adam = optax Adam on mini-batches",
        choices=("lm", "adam"),
    )
    add(
        "--max-iter",
        "max_iter",
        "maximum LM iterations, or Adam epochs",
        type=positive_int,
        metavar="N",
    )
    add(
        "--valid-fraction",
        "valid_fraction",
        "fraction of the grid held out for validation and early stopping, in (0, 1)",
        type=float,
        metavar="F",
    )
    add(
        "--patience",
        "patience",
        "iterations without improvement of a pixel's "
        "validation loss before it stops (or restarts)",
        type=positive_int,
        metavar="N",
    )
    add(
        "--seed",
        "seed",
        "seed of the split, the initialisation and the restarts",
        type=int,
    )
    add(
        "--pixel-batch",
        "pixel_batch",
        "pixels per LM step; memory grows as n_spec x pixel_batch x n_params x 4 bytes",
        type=positive_int,
        metavar="N",
    )
    add(
        "--learning-rate",
        "learning_rate",
        "Adam step size (adam only)",
        type=float,
        metavar="LR",
    )
    add(
        "--batch-size",
        "batch_size",
        "Adam mini-batch size in spectra (adam only)",
        type=positive_int,
        metavar="N",
    )


def config_from_json(path: Path) -> dict:
    """Settings of a JSON config file, type-checked against TrainConfig's fields."""
    try:
        data = json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not a text (JSON) file") from err
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from err
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a JSON object of TrainConfig settings, got "
            f"a {type(data).__name__}"
        )
    unknown = sorted(set(data) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(
            f"{path}: unknown TrainConfig key(s) {unknown}; valid keys: "
            f"{', '.join(CONFIG_FIELDS)}"
        )
    for key, value in data.items():
        default = CONFIG_FIELDS[key].default
        if key == "hidden":
            ok = (isinstance(value, int) and not isinstance(value, bool)) or (
                isinstance(value, list)
                and value
                and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            )
            want = "an integer or a list of integers"
        elif isinstance(default, bool) or default is None:
            ok, want = True, ""
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
            want = "an integer"
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            want = "a number"
        elif isinstance(default, str):
            ok, want = isinstance(value, str), "a string"
        else:
            ok, want = True, ""
        if not ok:
            raise ValueError(f"{path}: {key} must be {want}, got {json.dumps(value)}")
    return data


def _load_grid(path: Path, label_names: str | None, labels: str | None) -> SpectralGrid:
    """The grid GRID names: a payne_lite grid, The Payne's .npz, a Payne Zero
    folder (with its label table) or another .npz / HDF5 grid."""
    names = None
    if label_names is not None:
        names = [s.strip() for s in label_names.split(",")]
    if path.is_dir():
        table = None if labels is None else require_file(labels)
        return checked_read(
            SpectralGrid.from_payne_zero, path, labels=table, label_names=names
        )
    if labels is not None:
        raise ValueError("--labels applies to a folder of Payne Zero spectra only")
    if path.suffix.lower() == ".npz":
        if _is_payne_training_npz(path):
            return checked_read(SpectralGrid.from_payne_npz, path, label_names=names)
        return checked_read(SpectralGrid.from_file, path, label_names=names)
    if not _is_payne_lite_hdf5(path):
        return checked_read(SpectralGrid.from_file, path, label_names=names)
    if label_names is not None:
        raise ValueError(
            "--label-names applies to .npz and foreign HDF5 grids only; a "
            "payne_lite .h5 grid carries its own label names"
        )
    return checked_read(SpectralGrid.load, path)


def _is_payne_training_npz(path: Path) -> bool:
    """A .npz with The Payne's ``labels`` and ``spectra`` (else: another layout;
    an unreadable file is left to the reader to refuse)."""
    try:
        with np.load(path, allow_pickle=False) as d:
            return {"labels", "spectra"} <= set(d.files)
    except (OSError, ValueError, EOFError):
        return True


def _is_payne_lite_hdf5(path: Path) -> bool:
    """A file payne_lite wrote (its checksum block, or a ``format`` attribute);
    others are read as foreign grids."""
    if _h5.looks_stamped(path):
        return True
    try:
        with h5py.File(path, "r") as f:
            return "format" in f.attrs
    except (OSError, KeyError, RuntimeError):
        return True  # not HDF5 at all: SpectralGrid.load refuses it, naming why


def run_train(args) -> int:
    grid_path = Path(args.grid) if Path(args.grid).is_dir() else require_file(args.grid)
    out = check_output(args.output, inputs=[grid_path])
    settings = {}
    if args.config is not None:
        settings.update(config_from_json(require_file(args.config)))
    settings.update({k: getattr(args, k) for k in CONFIG_FIELDS if hasattr(args, k)})
    config = TrainConfig(**settings)  # validates: ValueError names the bad setting
    ckpt = None
    if args.checkpoint is not None:
        ckpt = check_output(args.checkpoint, inputs=[grid_path])
        if ckpt.resolve() == out.resolve():
            raise ValueError(
                f"--checkpoint {ckpt} is the output file; give another name"
            )
        if ckpt.exists() and not args.resume:
            raise FileExistsError(
                f"checkpoint {ckpt} exists; add --resume to "
                "continue from it, or remove it"
            )
    elif args.resume:
        raise ValueError("--resume needs --checkpoint CKPT.h5")
    grid = _load_grid(grid_path, args.label_names, args.labels)
    _log.info("training on %r with %s", grid, config)
    emu = train_emulator(
        grid,
        config=config,
        progress=not args.no_progress,
        checkpoint=ckpt,
        resume=args.resume,
        checkpoint_every=args.checkpoint_every,
    )
    emu = dataclasses.replace(
        emu,
        meta={**emu.meta, "command": args.command_line, "grid_file": str(grid_path)},
    )
    emu.save(out)
    m = emu.meta
    n_iter = len(emu.history.get("valid_rms", ()))
    print(
        f"trained {emu.n_pix} pixels ({config.optimizer}, hidden "
        f"{','.join(map(str, emu.hidden))}, {config.activation}, {n_iter} "
        f"iterations) on {m['n_train']} spectra, {m['n_valid']} held out: "
        f"held-out median |error| {m['valid_median_abs_error']:.2e}, 99th "
        f"percentile pixel {m['valid_p99_pixel_abs_error']:.2e}; "
        f"{m['train_seconds']:.1f} s; wrote {out}"
    )
    return EXIT_OK
