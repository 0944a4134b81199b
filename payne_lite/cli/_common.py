"""What every ``payne-lite`` subcommand shares: exit codes, the parser and help
classes, argument types and the checks of input and output files.

The subcommands' modules (``_grid``, ``_train``, ``_predict``, ``_info``, ``_demo``,
``_fit``, ``_mdn``, ``_plot``, ``_bench``) import from here; ``_main`` assembles them.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .._validate import existing_file
from ..errors import FileFormatError

PROG = "payne-lite"
EXIT_OK = 0
EXIT_FAILED = 1  # a run that failed on valid input (training diverged, output locked,
# the Dask scheduler went away)
EXIT_USAGE = 2  # bad input: same code as argparse's own usage errors
EXIT_INTERRUPTED = 130


class HelpFormatter(
    argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter
):
    """Show defaults and keep the hand-made line breaks of descriptions and epilogs.

    On/off flags and options without a default get no "(default: ...)" suffix.
    """

    def _get_help_string(self, action):
        if any(action.default is d for d in (None, False, argparse.SUPPRESS)) or (
            isinstance(action, argparse._CountAction)
        ):
            return action.help
        return super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line that points to the command's --help."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text!r}")
    return value


def add_subcommand(
    sub, name: str, *, help: str, description: str, epilog: str = ""
) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (with -v and --debug) in ``sub``."""
    return sub.add_parser(
        name,
        help=help,
        description=description,
        epilog=epilog,
        formatter_class=HelpFormatter,
        parents=[common_options(sub=True)],
    )


def common_options(*, sub: bool) -> argparse.ArgumentParser:
    """-v and --debug, accepted before and after the subcommand name."""
    p = OneLineErrorParser(add_help=False)
    # In a subcommand, SUPPRESS keeps an absent flag from resetting the top-level value.
    sup = argparse.SUPPRESS
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=sup if sub else 0,
        help="log progress messages (INFO) to stderr; -vv for DEBUG",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=sup if sub else False,
        help="on error, show the full Python traceback instead of one line",
    )
    return p


# ======================================================================================
# Small helpers
# ======================================================================================
require_file = existing_file


def check_output(path: str | os.PathLike, *, inputs: Sequence[Path] = ()) -> Path:
    """Refuse, before any long work, an output that cannot be written or would
    overwrite an input file."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: is a directory; give an output file name")
    for src in inputs:
        if p.exists() and p.resolve() == src.resolve():
            raise ValueError(
                f"{p}: output would overwrite the input file; "
                "choose another output name"
            )
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # the missing folders will be created
    try:  # a real probe: os.access is wrong for root and on some file systems
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as err:
        raise OSError(
            err.errno, f"cannot write into {parent}: {err.strerror}", str(p)
        ) from err
    return p


def checked_read(loader: Callable, path: Path, **kw):
    """``loader(path, **kw)``, with h5py's reports of corrupt metadata (a KeyError or
    RuntimeError rather than an OSError) turned into a FileFormatError."""
    try:
        return loader(path, **kw)
    except (KeyError, RuntimeError) as err:
        detail = err.args[0] if err.args else type(err).__name__
        raise FileFormatError(f"{path}: corrupt file ({detail})") from err


def load_pixel_mask(path) -> np.ndarray:
    """A ``--mask`` file: a (P,) bool ``.npy`` array (True = leave the pixel out),
    as ``PixelResiduals.save`` and ``payne-lite check --mask-out`` write it."""
    mask = np.load(require_file(path), allow_pickle=False)
    if mask.dtype != bool or mask.ndim != 1:
        raise ValueError(
            f"--mask: expected a (P,) bool array, got {mask.dtype} {mask.shape}"
        )
    return mask


def human_size(n_bytes: int) -> str:
    """``1234567`` -> ``'1.2 MB'`` (decimal units)."""
    size = float(n_bytes)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000.0 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000.0
    raise AssertionError("unreachable")


def parse_number(token: str, where: str) -> float:
    """``float(token)``; a ValueError that names ``where`` (an option or a file line)."""
    try:
        return float(token)
    except ValueError:
        raise ValueError(f"{where}: {token!r} is not a number") from None


def flag_name(text: str) -> str:
    """'at a bound (training box or rv window)' -> 'at a bound'."""
    return text.split(" (")[0].split(":")[0]
