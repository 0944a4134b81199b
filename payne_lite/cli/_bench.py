"""``payne-lite bench``: the repository's regression suite (benchmarks/suite.py),
loaded lazily, only when the command runs."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from ._common import EXIT_USAGE, PROG, HelpFormatter, OneLineErrorParser, common_options

#: The regression suite lives in the repository, beside the package (an editable
#: install or a checkout); wheels do not carry it. Only ``payne-lite bench`` loads it,
#: when it runs, as the package :data:`_BENCH_PACKAGE` (the checkout's benchmarks/).
BENCH_SUITE = Path(__file__).resolve().parents[2] / "benchmarks" / "suite.py"
_BENCH_PACKAGE = "payne_lite_benchmarks"

_BENCH_DESCRIPTION = (
    "Run the regression benchmark suite of the repository's benchmarks/\n"
    "folder: emulator accuracy and training time, evaluation throughput and\n"
    "fraction of the activation bound, fit accuracy and speed next to a\n"
    "The-Payne-style baseline timed in the same run, MDN calibration and\n"
    "speed-up. Writes results.json and results.md and compares them with the\n"
    "committed reference (benchmarks/reference_<mode>.json): accuracy and\n"
    "coverage gate with stated tolerances, speed only as ratios to the\n"
    "same-run baseline. Exit status 1 on a regression or a failed section.\n"
    "Details: benchmarks/suite.py and benchmarks/README.md."
)
_BENCH_EPILOG = (
    "examples:\n  payne-lite bench --quick\n"
    "  payne-lite bench --mdn mdn.h5 -o bench_out\n"
    "  payne-lite bench --quick --compare bench_out/results.json"
)


@functools.cache
def _bench_suite_or_error():
    """(``benchmarks/suite.py`` as a module or None, why it is None).

    Imports the checkout's ``benchmarks/`` folder as the package
    :data:`_BENCH_PACKAGE` (a private name: no clash with any other ``benchmarks``),
    so that the suite's relative imports of the single benchmarks work.
    """
    if not BENCH_SUITE.is_file():
        return None, (
            f"payne-lite bench runs the repository's benchmarks/suite.py, which this "
            f"installation does not have (looked for {BENCH_SUITE}): clone the "
            "repository and install it editable (pip install -e .), or run "
            "python benchmarks/suite.py in the checkout"
        )
    import importlib
    import importlib.util
    import types

    def forget():
        for name in [n for n in sys.modules if n.split(".")[0] == _BENCH_PACKAGE]:
            del sys.modules[name]

    forget()  # a suite loaded from another BENCH_SUITE before
    folder = BENCH_SUITE.parent
    try:  # a broken suite must not break the other commands
        init = folder / "__init__.py"
        if init.is_file():
            spec = importlib.util.spec_from_file_location(
                _BENCH_PACKAGE, init, submodule_search_locations=[str(folder)]
            )
            package = importlib.util.module_from_spec(spec)
            sys.modules[_BENCH_PACKAGE] = package
            spec.loader.exec_module(package)
        else:
            package = types.ModuleType(_BENCH_PACKAGE)
            package.__path__ = [str(folder)]
            sys.modules[_BENCH_PACKAGE] = package
        module = importlib.import_module(f"{_BENCH_PACKAGE}.{BENCH_SUITE.stem}")
    except Exception as err:
        forget()
        return None, f"{BENCH_SUITE} does not load: {type(err).__name__}: {err}"
    return module, ""


def _bench_suite():
    """``benchmarks/suite.py`` as a module, or None where it is absent or broken."""
    return _bench_suite_or_error()[0]


class _BenchArguments(argparse.Action):
    """Keep the arguments of ``payne-lite bench`` for the suite's own parser, built
    when the command runs (:func:`run_bench`); only -v and --debug are taken out
    here, as :func:`main` needs them before the command runs."""

    def __call__(self, parser, namespace, values, option_string=None):
        common, rest = common_options(sub=True).parse_known_args(list(values))
        for key, value in vars(common).items():
            setattr(namespace, key, value)
        setattr(namespace, self.dest, rest)


def add_bench(sub) -> None:
    # Nothing of the suite is loaded here: building the parser (for any command)
    # must not run the repository's benchmark code. "+" as the only prefix makes
    # every argument, options included, a value of bench_args.
    p = sub.add_parser(
        "bench",
        help="run the regression benchmark suite (needs a repository checkout)",
        description=_BENCH_DESCRIPTION,
        epilog=_BENCH_EPILOG,
        formatter_class=HelpFormatter,
        prefix_chars="+",
        add_help=False,
    )
    p.add_argument(
        "bench_args",
        nargs="*",
        action=_BenchArguments,
        metavar="options",  # the "options:" that `payne-lite bench --help` lists
        help="the suite's options (benchmarks/suite.py), read when the command runs",
    )


def _bench_parser(suite) -> argparse.ArgumentParser:
    """The parser of ``payne-lite bench``: the common options and the suite's."""
    p = OneLineErrorParser(
        prog=f"{PROG} bench",
        description=_BENCH_DESCRIPTION,
        epilog=_BENCH_EPILOG,
        formatter_class=HelpFormatter,
        parents=[common_options(sub=True)],
    )
    suite.add_arguments(p)
    return p


def run_bench(args) -> int:
    suite, why = _bench_suite_or_error()
    if suite is None:
        raise FileNotFoundError(why)
    try:
        bench_args = _bench_parser(suite).parse_args(args.bench_args)
    except SystemExit as exc:  # --help and usage errors
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    for key in ("verbose", "debug", "command", "command_line"):
        if hasattr(args, key):
            setattr(bench_args, key, getattr(args, key))
    return suite.run(bench_args)
