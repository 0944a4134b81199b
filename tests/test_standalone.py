"""The installed package stands alone: it does not reach into the repository checkout.

* The shipped default models are found through ``payne_lite._datafiles``: the
  installed package data (``payne_lite/_data``, what a wheel carries) first, then the
  checkout's ``data/`` (an editable install). What is built when nothing is shipped
  goes to the user cache, never next to the package.
* ``payne-lite`` loads ``benchmarks/suite.py`` only when ``payne-lite bench`` runs.
* The wheel carries the default emulator and MDN.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import payne_lite
from payne_lite import _datafiles, demo

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = Path(payne_lite.__file__).resolve().parent
EDITABLE = PACKAGE.parent == ROOT  # imported from this checkout


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    if not folder.is_dir():
        return {}
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """``$PAYNE_LITE_CACHE`` set to an empty folder (created by the code)."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("PAYNE_LITE_CACHE", str(folder))
    return folder


# --- the resolver -------------------------------------------------------------------
def test_resolver_finds_the_shipped_files():
    """In this editable install, the checkout's data/; in a wheel install, the
    package data. Package data comes first."""
    roots = _datafiles.search_roots()
    assert roots[0] == PACKAGE / "_data"
    for name in (_datafiles.DEFAULT_EMULATOR, _datafiles.DEFAULT_MDN):
        found = _datafiles.shipped_file(name)
        if EDITABLE:
            if not (ROOT / "data" / name).is_file():
                pytest.skip(f"data/{name} not in this checkout")
            assert roots[-1] == ROOT / "data"
            assert found == ROOT / "data" / name
        else:
            assert found == PACKAGE / "_data" / name
    assert demo.default_emulator_path() == _datafiles.shipped_file(
        _datafiles.DEFAULT_EMULATOR
    )
    assert demo.default_mdn_path() == _datafiles.shipped_file(_datafiles.DEFAULT_MDN)
    assert _datafiles.shipped_file("no_such_file.h5") is None


def test_resolver_order_and_unrelated_data_folders(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    for d in (first, second):
        d.mkdir()
        (d / "x.h5").write_bytes(b"")
    (second / "y.h5").write_bytes(b"")
    monkeypatch.setattr(_datafiles, "search_roots", lambda: [first, second])
    assert _datafiles.shipped_file("x.h5") == first / "x.h5"
    assert _datafiles.shipped_file("y.h5") == second / "y.h5"
    assert _datafiles.shipped_file("z.h5") is None


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PAYNE_LITE_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _datafiles.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("PAYNE_LITE_CACHE")
    assert _datafiles.cache_dir() == tmp_path / "xdg" / "payne_lite"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _datafiles.cache_dir() == tmp_path / "home" / ".cache" / "payne_lite"
    assert not (tmp_path / "home").exists()  # not created by asking


# --- the demo's loaders -------------------------------------------------------------
def test_default_emulator_is_built_into_the_cache_not_next_to_the_package(
    cache, tmp_path, monkeypatch, tiny_emulator, caplog
):
    """Nothing shipped (package data and checkout data both unavailable): the
    emulator is built (training stubbed with the tiny emulator) and saved into the
    cache; the next call loads it from there without training."""
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(_datafiles, "search_roots", lambda: [empty / "a", empty / "b"])
    before = {d: _files(d) for d in (PACKAGE, PACKAGE.parent / "data")}
    calls = []

    def fake_train(grid, **kw):
        calls.append(kw)
        return tiny_emulator

    monkeypatch.setattr("payne_lite.grid.synth.make_grid", lambda *a, **kw: "grid")
    monkeypatch.setattr("payne_lite.emulator.train_emulator", fake_train)
    target = cache / _datafiles.DEFAULT_EMULATOR
    assert demo.default_emulator_path() == target
    with caplog.at_level("WARNING", logger="payne_lite.demo"):
        emu = demo.load_default_emulator(progress=False)
    assert f"{target} not found: building" in caplog.text
    assert len(calls) == 1 and emu is tiny_emulator
    assert target.is_file()
    assert sorted(os.listdir(cache)) == [_datafiles.DEFAULT_EMULATOR]
    assert {d: _files(d) for d in before} == before  # nothing written there
    assert list(empty.iterdir()) == []

    again = demo.load_default_emulator(progress=False)  # from the cache
    assert len(calls) == 1
    assert again.n_pix == tiny_emulator.n_pix
    assert again.label_names == tiny_emulator.label_names


def test_mdn_for_another_emulator_is_trained_into_the_cache(
    cache, monkeypatch, tiny_emulator
):
    """The shipped MDN does not fit the tiny emulator: the MDN trained for it goes
    to the cache, the shipped file is left alone, and the next call reuses it."""
    from payne_lite import mdn as mdn_mod  # demo looks train_mdn up here

    shipped = _datafiles.shipped_file(_datafiles.DEFAULT_MDN)
    if shipped is None:
        pytest.skip("no shipped default MDN")
    shipped_before = (shipped.stat().st_mtime_ns, shipped.read_bytes())
    package_before = _files(PACKAGE)
    real_train = mdn_mod.train_mdn
    calls = []

    def small_train(emulator, **kw):  # the demo's settings, made small
        calls.append(kw)
        return real_train(
            emulator, n_train=256, n_valid=64, epochs=1, n_pca=4, hidden=(8,),
            batch_size=64, rv_range=(-50.0, 50.0), seed=0, progress=False,
        )  # fmt: skip

    monkeypatch.setattr(mdn_mod, "train_mdn", small_train)
    mdn = demo.load_default_mdn(tiny_emulator, progress=False)
    assert len(calls) == 1
    target = cache / _datafiles.DEFAULT_MDN
    assert target.is_file()
    assert (shipped.stat().st_mtime_ns, shipped.read_bytes()) == shipped_before
    assert _files(PACKAGE) == package_before
    again = demo.load_default_mdn(tiny_emulator, progress=False)
    assert len(calls) == 1  # the cached one fits this emulator
    assert again.label_names == mdn.label_names


# --- the command line ---------------------------------------------------------------
_NO_BENCH = r"""
import json, sys
from pathlib import Path
from payne_lite.cli import _bench, build_parser, main

bench_dir = _bench.BENCH_SUITE.parent.resolve()

def bench_modules():
    out = []
    for name, mod in list(sys.modules.items()):
        file = getattr(mod, "__file__", None) or ""
        if (
            "bench" in name.split(".")[0]
            or (file and Path(file).resolve().is_relative_to(bench_dir))
        ):
            out.append(name)
    return out

build_parser()
after_parser = bench_modules()
codes = [main(argv) for argv in json.loads(sys.argv[1])]
print(json.dumps(dict(after_parser=after_parser, codes=codes, after=bench_modules())))
"""


def test_cli_does_not_load_the_benchmarks_for_other_commands():
    """``build_parser()`` and commands other than bench (``--help`` included) leave
    benchmarks/ alone; run in a fresh interpreter, as a user's ``payne-lite``."""
    emu = _datafiles.shipped_file(_datafiles.DEFAULT_EMULATOR)
    commands = [["--help"], ["fit", "--help"], ["bench", "--bogus-option"]]
    if emu is not None:
        commands.insert(1, ["info", str(emu)])
    proc = subprocess.run(
        [sys.executable, "-c", _NO_BENCH, json.dumps(commands[:-1])],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["after_parser"] == [] and res["after"] == [], res
    assert res["codes"] == [0] * (len(commands) - 1)
    if cli_has_suite():
        # bench itself loads it, when it runs: its own options are checked then
        proc = subprocess.run(
            [sys.executable, "-c", _NO_BENCH, json.dumps(commands[-1:])],
            capture_output=True,
            text=True,
            check=False,
            timeout=300,
        )
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        assert res["after_parser"] == [] and res["after"], res
        assert res["codes"] == [2]
        assert "unrecognized arguments: --bogus-option" in proc.stderr


def cli_has_suite() -> bool:
    from payne_lite.cli import _bench

    return _bench.BENCH_SUITE.is_file()


def test_bench_help_shows_the_suite_options(capsys):
    from payne_lite.cli import main

    if not cli_has_suite():
        pytest.skip("no benchmarks/ beside the package")
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: payne-lite bench")
    for option in ("--quick", "--compare", "--only", "-v", "--debug"):
        assert option in out


def test_bench_without_the_suite_says_it_needs_a_checkout(
    tmp_path, monkeypatch, capsys
):
    from payne_lite.cli import _bench, main

    monkeypatch.setattr(_bench, "BENCH_SUITE", tmp_path / "benchmarks" / "suite.py")
    _bench._bench_suite_or_error.cache_clear()
    try:
        for argv in (["bench", "--quick"], ["bench", "--help"], ["-v", "bench"]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.startswith("payne-lite: error: payne-lite bench runs the ")
            assert "repository" in err and "Traceback" not in err
    finally:
        _bench._bench_suite_or_error.cache_clear()


def test_bench_passes_verbose_and_debug_on():
    from payne_lite.cli import build_parser

    ns = build_parser().parse_args(
        ["bench", "--quick", "-v", "--only", "fit", "mdn", "--debug"]
    )
    assert ns.verbose == 1 and ns.debug is True
    assert ns.bench_args == ["--quick", "--only", "fit", "mdn"]


# --- the wheel ----------------------------------------------------------------------
def test_wheel_carries_the_default_models(tmp_path):
    if not EDITABLE or not (ROOT / "pyproject.toml").is_file():
        pytest.skip("needs the repository checkout")
    for name in (_datafiles.DEFAULT_EMULATOR, _datafiles.DEFAULT_MDN):
        if not (ROOT / "data" / name).is_file():
            pytest.skip(f"data/{name} not in this checkout")
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q",
         "-w", str(tmp_path)],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    if (
        proc.returncode != 0
        and "hatchling" in proc.stderr
        and "No matching" in (proc.stderr)
    ):
        pytest.skip("hatchling not available to pip (offline)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = tmp_path.glob("payne_lite-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        for name in (_datafiles.DEFAULT_EMULATOR, _datafiles.DEFAULT_MDN):
            member = f"payne_lite/_data/{name}"
            assert member in names
            assert z.getinfo(member).file_size == (ROOT / "data" / name).stat().st_size
    assert "payne_lite/_datafiles.py" in names
    assert not any(n.startswith(("benchmarks/", "data/", "tests/")) for n in names)
