"""``payne-lite train-mdn``: train a mixture density network for an emulator;
``payne-lite train-flow``: train the conditional flow of an MDN."""

from __future__ import annotations

import dataclasses
import logging

from ..emulator import Emulator
from ..mdn import MDN
from ._common import (
    EXIT_OK,
    add_subcommand,
    check_output,
    checked_read,
    positive_int,
    require_file,
)

_log = logging.getLogger("payne_lite.cli")


def _add_training_options(p, d) -> None:
    """The options train-mdn and train-flow share (``d``: the config's defaults):
    seed, simulated spectra, epochs, early stopping, batch size, learning rate."""
    p.add_argument("--seed", type=int, default=d["seed"], help="random seed")
    for flag, name, what in (
        ("--n-train", "n_train", "simulated training spectra"),
        ("--n-valid", "n_valid", "simulated validation spectra (early stopping)"),
        ("--epochs", "epochs", "maximum passes over the training spectra"),
        ("--patience", "patience", "epochs without validation improvement before "
         "stopping"),
        ("--batch-size", "batch_size", "spectra per Adam step"),
    ):  # fmt: skip
        p.add_argument(
            flag, type=positive_int, default=d[name], metavar="N", dest=name,
            help=what,
        )  # fmt: skip
    p.add_argument(
        "--learning-rate", type=float, default=d["learning_rate"], metavar="LR",
        help="Adam step size (cosine decay)",
    )  # fmt: skip


def add_train_mdn(sub) -> None:
    from ..mdn import MDNConfig

    d = {f.name: f.default for f in dataclasses.fields(MDNConfig)}
    p = add_subcommand(
        sub,
        "train-mdn",
        help="train a mixture density network for an emulator",
        description=(
            "Train a mixture density network (MDN) that maps an observed spectrum to\n"
            "a Gaussian per label and rv, on noisy spectra simulated from EMULATOR\n"
            "(random labels in its box, rv, S/N, masked chunks, continuum tilts), and\n"
            "save it as one HDF5 file. `payne-lite fit --mdn` uses it to start and\n"
            "bound the fits."
        ),
        epilog=(
            "examples:\n  payne-lite train-mdn emulator.h5 -o mdn.h5\n"
            "  payne-lite train-mdn emulator.h5 -o mdn.h5 --n-train 200000 "
            "--snr-range 20 300 --rv-range -300 300"
        ),
    )
    p.add_argument("emulator", metavar="EMULATOR", help="a payne_lite emulator file")
    p.add_argument(
        "-o",
        "--output",
        required=True,
        metavar="MDN.h5",
        help="output HDF5 file (payne_lite.MDN format)",
    )
    _add_training_options(p, d)
    p.add_argument(
        "--n-components",
        type=positive_int,
        default=d["n_components"],
        metavar="M",
        help="Gaussians per label (a mixture when > 1)",
    )
    p.add_argument(
        "--snr-range",
        nargs=2,
        type=float,
        default=tuple(d["snr_range"]),
        metavar=("LO", "HI"),
        help="S/N per pixel of the training spectra (log-uniform)",
    )
    p.add_argument(
        "--rv-range",
        nargs=2,
        type=float,
        default=tuple(d["rv_range"]),
        metavar=("LO", "HI"),
        help="rv [km/s] of the training spectra (uniform)",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="do not show progress bars"
    )


def run_train_mdn(args) -> int:
    from ..mdn import MDNConfig, train_mdn

    emu_path = require_file(args.emulator)
    out = check_output(args.output, inputs=[emu_path])
    config = MDNConfig(
        n_train=args.n_train,
        n_valid=args.n_valid,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        n_components=args.n_components,
        snr_range=tuple(args.snr_range),
        rv_range=tuple(args.rv_range),
        seed=args.seed,
    )
    emu = checked_read(Emulator.load, emu_path)
    _log.info("training an MDN for %r with %s", emu, config)
    mdn = train_mdn(emu, config=config, progress=not args.no_progress)
    mdn = dataclasses.replace(
        mdn,
        meta={**mdn.meta, "command": args.command_line, "emulator_file": str(emu_path)},
    )
    mdn.save(out)
    m = mdn.meta
    print(
        f"trained an MDN ({mdn.n_components} component(s)) for "
        f"{', '.join(mdn.output_names)} on {config.n_train} simulated spectra "
        f"(S/N {config.snr_range[0]:g}-{config.snr_range[1]:g}, rv "
        f"{config.rv_range[0]:g} to {config.rv_range[1]:g} km/s), "
        f"{m['epochs_run']} epochs: validation NLL {m['best_valid_nll']:.3f}; "
        f"{m['train_seconds']:.1f} s; wrote {out}"
    )
    return EXIT_OK


def add_train_flow(sub) -> None:
    from ..mdn import FlowConfig

    d = {f.name: f.default for f in dataclasses.fields(FlowConfig)}
    p = add_subcommand(
        sub,
        "train-flow",
        help="train an MDN's conditional flow (the joint posterior, flow-is)",
        description=(
            "Train a conditional normalizing flow (a masked autoregressive flow) over\n"
            "the labels and rv given the MDN's spectral features, on spectra\n"
            "simulated from EMULATOR as the MDN's were, and save the MDN with it\n"
            "(format version 3). `payne-lite fit --method flow-is --mdn OUT` samples\n"
            "with it as the importance-sampling proposal; MDN.flow_sample draws from\n"
            "it alone."
        ),
        epilog=(
            "examples:\n  payne-lite train-flow emulator.h5 mdn.h5 -o mdn_flow.h5\n"
            "  payne-lite train-flow emulator.h5 mdn.h5 -o mdn_flow.h5 "
            "--n-train 300000 --layers 5"
        ),
    )
    p.add_argument("emulator", metavar="EMULATOR", help="a payne_lite emulator file")
    p.add_argument("mdn", metavar="MDN", help="the MDN file trained for EMULATOR")
    p.add_argument(
        "-o", "--output", required=True, metavar="OUT.h5",
        help="output HDF5 file: the MDN with its flow",
    )  # fmt: skip
    _add_training_options(p, d)
    p.add_argument(
        "--layers", type=positive_int, default=d["n_layers"], metavar="N",
        dest="n_layers", help="MADE layers of the flow",
    )  # fmt: skip
    p.add_argument(
        "--no-progress", action="store_true", help="do not show progress bars"
    )


def run_train_flow(args) -> int:
    from ..mdn import FlowConfig, train_flow

    emu_path = require_file(args.emulator)
    mdn_path = require_file(args.mdn)
    out = check_output(args.output, inputs=[emu_path, mdn_path])
    config = FlowConfig(
        n_train=args.n_train,
        n_valid=args.n_valid,
        epochs=args.epochs,
        patience=args.patience,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        n_layers=args.n_layers,
        seed=args.seed,
    )
    emu = checked_read(Emulator.load, emu_path)
    mdn = checked_read(MDN.load, mdn_path, emulator=emu)
    _log.info("training a flow for %r with %s", mdn, config)
    mdn = train_flow(emu, mdn, config=config, progress=not args.no_progress)
    flow = dataclasses.replace(
        mdn.flow,
        meta={**mdn.flow.meta, "command": args.command_line, "mdn_file": str(mdn_path)},
    )
    mdn = dataclasses.replace(mdn, flow=flow)
    mdn.save(out)
    m = flow.meta
    print(
        f"trained a flow ({flow.n_layers} MADE layers) over "
        f"{', '.join(mdn.output_names)} on {config.n_train} simulated spectra, "
        f"{m['epochs_run']} epochs: validation NLL {m['best_valid_nll']:.3f}; "
        f"{m['train_seconds']:.1f} s; wrote {out}"
    )
    return EXIT_OK
