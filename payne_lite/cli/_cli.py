"""Old home of the ``payne-lite`` command line, kept as an import path.

The command line now lives in the modules beside this one (see :mod:`._main`);
this module re-exports the names that code reads from ``payne_lite.cli._cli``:
:func:`main`, :func:`build_parser` and the train command's ``_CONFIG_FIELDS`` and
``_config_from_json``. To monkeypatch a name, patch the module that looks it up
(e.g. ``payne_lite.cli._bench.BENCH_SUITE``), not this one.
"""

from __future__ import annotations

from ._main import build_parser as build_parser
from ._main import main as main
from ._train import CONFIG_FIELDS as _CONFIG_FIELDS
from ._train import config_from_json as _config_from_json

__all__ = ["_CONFIG_FIELDS", "_config_from_json", "build_parser", "main"]
