"""payne_lite.cli: see the modules inside; public names re-exported here."""

from __future__ import annotations

from ._cli import build_parser as build_parser
from ._cli import main as main

__all__ = [
    "build_parser",
    "main",
]
