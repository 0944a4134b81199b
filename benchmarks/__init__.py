"""The repository's benchmarks, a package so that they import each other relatively.

Run them from the repository root as ``python -m benchmarks.suite --quick`` (or
``python benchmarks/suite.py --quick``; each script that imports a sibling makes
itself ``benchmarks.<name>`` when run by path). ``payne-lite bench`` loads this
folder from the checkout beside the package (see ``payne_lite/cli/_bench.py``); wheels do
not carry it.
"""
