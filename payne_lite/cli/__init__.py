"""payne_lite.cli: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._main import build_parser as build_parser
from ._main import main as main

__all__ = [
    "build_parser",
    "main",
]
