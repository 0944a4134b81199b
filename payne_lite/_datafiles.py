"""Where the package finds the data files it ships, and where it caches what it builds.

The default emulator and MDN are made by ``data/make_default_emulator.py`` and
``data/make_default_mdn.py`` into the repository's top-level ``data/`` folder, beside
the real example data (``data/payne_apogee/``, ``data/apogee_raw/``, read through
:mod:`payne_lite.datasets`); wheels carry them as package data, ``payne_lite/_data/``
(``force-include`` in ``pyproject.toml``). :func:`shipped_file` and
:func:`shipped_dir` look in the installed package data first, then in the checkout's
``data/`` (an editable install, or the source tree itself).
Whatever the package builds when nothing is shipped goes to :func:`cache_dir`, never
next to the package.

A leaf module: it imports nothing from ``payne_lite``.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

#: File names of the shipped defaults (the same in ``data/`` and ``payne_lite/_data/``).
DEFAULT_EMULATOR = "default_emulator.h5"
DEFAULT_MDN = "default_mdn.h5"

#: Environment variable that overrides :func:`cache_dir`.
CACHE_ENV = "PAYNE_LITE_CACHE"


def search_roots() -> list[Path]:
    """The folders :func:`shipped_file` and :func:`shipped_dir` look in, first match
    wins.

    1. ``payne_lite/_data`` of the installed package (a wheel install);
    2. ``data/`` of the repository checkout the package is imported from (an
       editable install), recognised by ``data/make_default_emulator.py`` so that
       an unrelated ``site-packages/data`` folder is never taken for it.
    """
    roots = []
    package = resources.files(__package__ or "payne_lite")
    if isinstance(package, os.PathLike):  # not zipped: h5py needs real files
        roots.append(Path(package) / "_data")
    checkout = Path(__file__).resolve().parents[1] / "data"
    if (checkout / "make_default_emulator.py").is_file():
        roots.append(checkout)
    return roots


def shipped_file(name: str) -> Path | None:
    """The shipped data file ``name`` (e.g. :data:`DEFAULT_EMULATOR`), or None."""
    for root in search_roots():
        path = root / name
        if path.is_file():
            return path
    return None


def shipped_dir(name: str) -> Path | None:
    """The shipped data folder ``name`` (e.g. ``"payne_apogee"``), or None."""
    for root in search_roots():
        path = root / name
        if path.is_dir():
            return path
    return None


def cache_dir() -> Path:
    """The user's cache folder for files the package builds (not created here).

    ``$PAYNE_LITE_CACHE``, else ``$XDG_CACHE_HOME/payne_lite``, else
    ``~/.cache/payne_lite``.
    """
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "payne_lite"
