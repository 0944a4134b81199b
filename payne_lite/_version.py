"""The package version (one place: pyproject.toml reads it with hatch)."""

__version__ = "0.1.0"
