"""The ``payne-lite`` command line: make grids, train emulators, predict, fit catalogs.

Usage::

    payne-lite grid -o grid.h5 --n-spec 3000
    payne-lite train grid.h5 -o emulator.h5 --hidden 10
    payne-lite predict emulator.h5 --labels 5000,4.5,0,0.1,5 -o flux.npy
    payne-lite info emulator.h5
    payne-lite fit catalog.h5 --emulator emulator.h5 -o results.fits
    payne-lite bench --quick

Every subcommand is a pair of functions in its own module (``_grid``, ``_train``,
...): ``add_<name>(subparsers)`` declares the options and ``run_<name>(args) -> int``
does the work; :data:`_COMMANDS` lists them. Bad input (missing or corrupt files,
invalid values) ends with one line ``payne-lite: error: <message>`` on stderr and exit
code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence

from .._version import __version__
from ..errors import (
    ErrorModelWarning,
    KilledWorkerError,
    OutputLockedError,
    SchedulerLostError,
    TrainingDivergedError,
    WavelengthGridWarning,
)
from ._bench import add_bench, run_bench
from ._calibrate import (
    add_calibrate_errors,
    add_error_basis,
    add_local_error,
    run_calibrate_errors,
    run_error_basis,
    run_local_error,
)
from ._check import add_check, run_check
from ._common import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    HelpFormatter,
    OneLineErrorParser,
    common_options,
)
from ._demo import add_demo, run_demo
from ._fit import add_fit, run_fit
from ._grid import add_grid, run_grid
from ._info import add_info, run_info
from ._mdn import add_train_flow, add_train_mdn, run_train_flow, run_train_mdn
from ._plot import add_plot, run_plot
from ._predict import add_predict, join_negative_values, run_predict
from ._train import add_train, run_train

# ======================================================================================
# Subcommand registry.
#
# Each subcommand is an add_<name>(subparsers) / run_<name>(args) -> int pair.
# ======================================================================================
_COMMANDS: dict[str, tuple[Callable, Callable[[argparse.Namespace], int]]] = {
    "grid": (add_grid, run_grid),
    "train": (add_train, run_train),
    "predict": (add_predict, run_predict),
    "info": (add_info, run_info),
    "demo": (add_demo, run_demo),
    "fit": (add_fit, run_fit),
    "train-mdn": (add_train_mdn, run_train_mdn),
    "train-flow": (add_train_flow, run_train_flow),
    "calibrate-errors": (add_calibrate_errors, run_calibrate_errors),
    "error-basis": (add_error_basis, run_error_basis),
    "local-error": (add_local_error, run_local_error),
    "check": (add_check, run_check),
    "plot": (add_plot, run_plot),
    "bench": (add_bench, run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``payne-lite`` argument parser with all subcommands."""
    parser = OneLineErrorParser(
        prog=PROG,
        formatter_class=HelpFormatter,
        parents=[common_options(sub=False)],
        description=(
            "payne_lite: emulate and fit stellar spectra with per-pixel\n"
            "neural networks (The Payne; Ting et al. 2019, ApJ 879, 69)."
        ),
        epilog=(
            "typical session:\n"
            "  payne-lite grid -o grid.h5\n"
            "  payne-lite train grid.h5 -o emulator.h5\n"
            "  payne-lite info emulator.h5\n"
            "  payne-lite predict emulator.h5 --labels 5000,4.5,0,0.1,5 "
            "-o flux.csv\n"
            "  payne-lite fit catalog.h5 --emulator emulator.h5 -o results.fits\n"
            "  payne-lite check results.fits catalog.h5 --emulator emulator.h5 "
            "-o checked.fits\n"
            f"\n`{PROG} COMMAND --help` describes each command's options."
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {__version__}"
    )
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, title="commands"
    )
    for add, _ in _COMMANDS.values():
        add(sub)
    return parser


@contextlib.contextmanager
def _logging_to_stderr(verbosity: int):
    """Route the package's log records to stderr for the duration of one command."""
    logger = logging.getLogger("payne_lite")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    old_level = logger.level
    logger.setLevel(
        logging.WARNING
        if verbosity <= 0
        else logging.INFO
        if verbosity == 1
        else logging.DEBUG
    )
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:
        text = f"{err.filename}: {err.strerror}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def _show_warning(message, category, filename, lineno, file=None, line=None):
    print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``payne-lite`` on ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Exit codes: 0 success, 1 training diverged, another run owns the output or the
    Dask scheduler went away, 2 bad input or usage (one line on stderr), 130
    interrupted.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(join_negative_values(argv))
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.command_line = shlex.join([PROG, *argv])
    _, run = _COMMANDS[args.command]
    with _logging_to_stderr(args.verbose), warnings.catch_warnings():
        if not args.debug:  # one line per warning, like the errors (no source line)
            warnings.showwarning = _show_warning
        for shown in (WavelengthGridWarning, ErrorModelWarning):  # never raised
            warnings.simplefilter("default", shown)
        try:
            return run(args)
        except (OSError, ValueError) as err:  # FileFormatError is a ValueError
            if args.debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        except (
            TrainingDivergedError,
            OutputLockedError,
            SchedulerLostError,
            KilledWorkerError,
        ) as err:
            if args.debug:
                raise
            print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"{PROG}: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
