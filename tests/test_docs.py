"""The documentation (docs/, Sphinx + MyST) and the README: the site builds offline
with warnings as errors, and every ```python block of its pages and of README.md runs.

Examples run page by page, their blocks in order in one namespace, in an empty temporary
folder (as a reader would paste them), so one page's blocks may use names an earlier
block of the same page made. A block that takes too long to run here (more than about
30 s: training, sampling) is preceded by the marker

    <!-- docs-test: skip, <why>; covered by tests/<file>.py or benchmarks/<file>.py -->

(an HTML comment: invisible in the built pages and on GitHub), and must name the test
or benchmark that runs the same calls; the marker check below holds it to that.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(ROOT).as_posix() for p in DOCS.rglob("*.md")) + [
    "README.md"
]
SKIP = re.compile(r"<!--\s*docs-test:\s*skip\b(?P<why>.*?)-->\s*\n$", re.S)
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: The README's two set-up commands (the landing page keeps them, word for word).
SETUP_COMMANDS = (
    "python -m pip install -e . && payne-lite demo              # the main job on the "
    "built-in default",
    'python -m pip install -e ".[test]" && python -m pytest     # the tests (what CI runs)',
)


def python_blocks(page: str) -> list[tuple[int, str, str | None]]:
    """(line, code, skip reason or None) of each ```python block of a page."""
    text = (ROOT / page).read_text()
    out = []
    for m in BLOCK.finditer(text):
        before = text[: m.start()]
        skip = SKIP.search(before[-400:])
        line = before.count("\n") + 2
        out.append((line, m.group(1), skip.group("why").strip() if skip else None))
    return out


def test_docs_build_offline_with_warnings_as_errors(tmp_path):
    """The site builds from the checkout with -W (every warning an error), -E (no saved
    environment), and nothing from the network (conf.py uses no intersphinx)."""
    pytest.importorskip("sphinx")
    pytest.importorskip("myst_parser")
    out = tmp_path / "html"
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         str(DOCS), str(out), "-d", str(tmp_path / "doctrees")],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert (out / "index.html").is_file()
    api = (out / "api" / "payne_lite.html").read_text()
    import payne_lite as pl

    missing = [n for n in pl.__all__ if f'id="payne_lite.{n}"' not in api]
    # modules (datasets, spectra, broadening) have pages of their own
    assert all(type(getattr(pl, n)).__name__ == "module" for n in missing), missing
    qa = (out / "qa-bits.html").read_text()
    assert "FLAG_POOR_FIT" in qa and "POOR_FIT_MISFIT" in qa


def test_conf_uses_no_network():
    code = (DOCS / "conf.py").read_text().split('"""', 2)[2]  # after the docstring
    assert "intersphinx" not in code and "http" not in code


def test_readme_is_a_landing_page():
    """What it is, the two set-up commands exactly, one example, links to the docs."""
    readme = (ROOT / "README.md").read_text()
    for cmd in SETUP_COMMANDS:
        assert cmd in readme
    assert len(BLOCK.findall(readme)) == 1
    for link in re.findall(r"\]\((docs/[^)#]+)", readme):
        assert (ROOT / link).is_file(), link


@pytest.mark.parametrize("page", PAGES)
def test_skip_markers_name_what_covers_them(page):
    for line, _, why in python_blocks(page):
        if why is None:
            continue
        covers = re.findall(r"\b(?:tests|benchmarks)/[\w/]+\.py", why)
        assert covers, f"{page}:{line}: a skipped example names no test or benchmark"
        for path in covers:
            assert (ROOT / path).is_file(), f"{page}:{line}: {path} does not exist"


def _check_quick_start(scope, snapshots):
    """docs/getting-started.md: the predict and fit blocks, then the same star as a
    specutils Spectrum gives the same labels (what the README's quick start did)."""
    flux, table = snapshots[1]["flux"], snapshots[1]["table"]
    assert flux.shape == (2, 7214) and Path("apogee_payne.h5").is_file()
    assert len(table) == 1 and 4500 < table["Teff"][0] < 5500
    spec_table, model = scope["table"], scope["model"]
    for c in ("Teff", "logg", "[Fe/H]", "rv"):
        assert spec_table[c][0] == pytest.approx(table[c][0], rel=1e-6, abs=1e-6)
    assert str(model.spectral_axis.unit) == "nm" and model.flux.shape == (7214,)


def _check_catalog(scope, snapshots):
    table = scope["table"]
    assert len(table) == 4 and list(table["id"]) == scope["names"]
    assert 4500 < table["Teff"][0] < 5500  # the combined spectrum, as in pl.fit


def _check_visits(scope, snapshots):
    t = scope["t"]
    assert len(t) == 1 and t["rv"].shape == (1, 3)
    assert t["flags"][0] & 128  # the double-lined binary is a poor fit


def _check_reader(scope, snapshots):
    assert scope["table"]["id"][0] == "2M13012770+5754582"


#: Checks of what a page's examples computed: page -> check(scope, snapshots), where
#: snapshots[i] is a shallow copy of the namespace after block i.
CHECKS = {
    "docs/getting-started.md": _check_quick_start,
    "docs/howto/fit-catalog.md": _check_catalog,
    "docs/howto/fit-visits.md": _check_visits,
    "docs/howto/add-reader.md": _check_reader,
}


@pytest.mark.parametrize(
    "page", [p for p in PAGES if any(w is None for _, _, w in python_blocks(p))]
)
def test_python_examples_run(page, tmp_path, monkeypatch):
    """Every unmarked ```python block of the page runs, in order, from an empty folder;
    the pages with checks then have their results checked."""
    if (
        page == "docs/getting-started.md"
        and importlib.util.find_spec("specutils") is None
    ):
        pytest.skip(
            "the quick start's Spectrum example needs specutils (the test extra)"
        )
    import matplotlib

    matplotlib.use("Agg")
    from payne_lite.catalog import _readers

    readers = list(_readers.READERS)  # a page may register a reader: put them back
    monkeypatch.chdir(tmp_path)
    scope: dict = {"__name__": "__docs__"}
    snapshots = []
    try:
        for line, code, why in python_blocks(page):
            if why is None:
                # line numbers in tracebacks are the page's
                exec(compile("\n" * (line - 1) + code, str(ROOT / page), "exec"), scope)
            snapshots.append(dict(scope))
        if page in CHECKS:
            CHECKS[page](scope, snapshots)
    finally:
        _readers.READERS[:] = readers
