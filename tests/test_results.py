"""Tests for payne_lite.catalog: results tables to FITS / ECSV / HDF5 and back.

The table comes from a real ``payne_lite.fit`` call on noise-free spectra of a tiny
random emulator (labels Teff, logg, [Fe/H]; units K, dex, dex), with a continuum and
model flux, plus one spectrum whose errors are all invalid (a failed row: NaNs,
``flags`` = 4), so that NaN, bool, int and (n, k, k) columns all make the trip.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from payne_lite import FileFormatError, fit
from payne_lite.catalog import (
    KEY_COLUMNS,
    KEY_VERSION,
    RESULTS_FORMAT_VERSION,
    SAFE_NAME_EXAMPLES,
    read_results,
    safe_column_name,
    write_results,
)
from payne_lite.fitting import FLAG_FAILED, check_results_schema

SUFFIXES = (".fits", ".fit", ".ecsv", ".h5", ".hdf5")
FITS_SAFE = re.compile(r"^[A-Za-z0-9_]+$")


@pytest.fixture(scope="module")
def results(make_emulator):
    emu = make_emulator(n_pix=200)
    labels = np.array([[5000.0, 3.0, -0.5], [6000.0, 4.0, 0.0], [4500.0, 2.0, -1.0]])
    flux = np.asarray(emu.predict(labels), np.float64)
    flux = np.concatenate([flux, flux[:1]])
    err = np.full_like(flux, 0.01)
    err[3] = -1.0  # no usable pixel: a failed row
    t = fit(flux, err, emu, cont_deg=1, return_model=True, rv_range=(-100.0, 100.0))
    assert list(t["flags"][:3]) == [0, 0, 0] and t["flags"][3] & FLAG_FAILED
    return t


def assert_tables_equal(got, want):
    assert got.colnames == want.colnames
    for name in want.colnames:
        g, w = got[name], want[name]
        assert type(g) is type(w), name
        assert g.unit == w.unit, name
        assert g.dtype == w.dtype, name
        assert g.shape == w.shape, name
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=name)
    assert dict(got.meta) == dict(want.meta)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_round_trip(results, tmp_path, suffix):
    path = tmp_path / f"results{suffix}"
    assert write_results(results, path) == path
    back = read_results(path)
    assert_tables_equal(back, results)
    assert back["[Fe/H]"].unit == "dex" and back["rv_err"].unit == "km / s"
    assert back["covariance"].shape == (4, 6, 6)
    assert back["converged"].dtype == bool and back["flags"].dtype == np.int32
    assert back.meta["flag_bits"]["2"].startswith("failed")
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # no temp left


@pytest.mark.parametrize("suffix", [".fits", ".ecsv", ".h5"])
def test_empty_strings_round_trip(results, tmp_path, suffix):
    """A string column with empty entries (a sampler's ``failure``: '' for every
    star that did not fail) reads back as written. ECSV stores '' as an empty field,
    which astropy reads as masked: the file's checksum failed on it ("its content
    does not match the checksum") for every emcee / mdn-is / flow-is table."""
    t = results.copy()
    t["failure"] = ["", "no usable pixel", "", ""]
    t["method"] = ["", "", "", ""]  # all empty: a one-character column
    path = tmp_path / f"r{suffix}"
    write_results(t, path)
    back = read_results(path)
    assert_tables_equal(back, t)
    assert list(back["failure"]) == ["", "no usable pixel", "", ""]


def test_results_schema_checked(results, tmp_path):
    """The schema holds through a file round trip; what a table lacks is named."""
    back = read_results(write_results(results, tmp_path / "r.fits"))
    check_results_schema(back)
    assert back.meta["kind"] == "point" and back.meta["rv_range"] == [-100.0, 100.0]
    broken = back.copy()
    broken.remove_column("logg_err")
    broken["Teff"].unit = "km/s"
    del broken.meta["instrument"]
    with pytest.raises(ValueError) as info:
        check_results_schema(broken)
    text = str(info.value)
    for what in ("meta['instrument']", "'logg_err'", "'Teff' in km / s, not K"):
        assert what in text, text


def test_fits_file_has_safe_names_and_complete_mapping(results, tmp_path):
    path = write_results(results, tmp_path / "r.fits")
    with fits.open(path) as hdul:
        hdu = hdul["RESULTS"]
        names = list(hdu.columns.names)
        hdr = hdu.header
        mapping = json.loads(hdr[KEY_COLUMNS])
        assert hdr[KEY_VERSION] == RESULTS_FORMAT_VERSION
        assert "CHECKSUM" in hdr and "DATASUM" in hdr  # verified on read
        assert hdu.verify_checksum() == 1 and hdu.verify_datasum() == 1
        for i, name in enumerate(names, start=1):
            assert FITS_SAFE.match(name), name
            assert not set("[/]") & set(name)
            assert hdr.comments[f"TTYPE{i}"] == results.colnames[i - 1]
        units = {
            hdr[f"TTYPE{i}"]: hdr.get(f"TUNIT{i}") for i in range(1, len(names) + 1)
        }
    assert names[:6] == ["TEFF", "TEFF_ERR", "LOGG", "LOGG_ERR", "FE_H", "FE_H_ERR"]
    assert [m["fits"] for m in mapping] == names
    assert [m["name"] for m in mapping] == results.colnames
    assert units["TEFF"] == "K" and units["RV_ERR"] == "km s-1"
    assert units["FE_H"] == "dex" and units["CHI2"] is None
    # a plain astropy reader sees the safe names too, without warnings
    plain = Table.read(path, hdu=1, unit_parse_strict="silent", mask_invalid=False)
    assert plain.colnames == names
    np.testing.assert_array_equal(plain["FE_H"], results["[Fe/H]"])


def test_write_leaves_the_table_unchanged(results, tmp_path):
    before = results.copy()
    write_results(results, tmp_path / "r.fits")
    write_results(results, tmp_path / "r.ecsv")
    assert_tables_equal(results, before)


def test_description_and_nested_meta_round_trip(results, tmp_path):
    t = results[:2].copy()
    t["flags"].description = "QA bitmask, see meta['flag_bits']"
    t.meta["nested"] = {"a": [1, 2.5, None], "b": {"c": "d"}, "n": np.int64(3)}
    for suffix in (".fits", ".ecsv", ".h5"):
        back = read_results(write_results(t, tmp_path / f"d{suffix}"))
        assert back["flags"].description == t["flags"].description, suffix
        assert back.meta["nested"] == {"a": [1, 2.5, None], "b": {"c": "d"}, "n": 3}


def test_overwrite_refused_without_flag(results, tmp_path):
    for suffix in (".fits", ".ecsv", ".h5"):
        path = write_results(results[:1], tmp_path / f"r{suffix}")
        with pytest.raises(FileExistsError, match="overwrite=True"):
            write_results(results, path)
        assert len(read_results(path)) == 1  # untouched
        write_results(results, path, overwrite=True)
        assert len(read_results(path)) == len(results)
    assert len(list(tmp_path.iterdir())) == 3


@pytest.mark.parametrize("name", ["r.txt", "r.csv", "r", "r.fits.gz"])
def test_unknown_suffix(results, tmp_path, name):
    with pytest.raises(ValueError, match="unknown results file suffix"):
        write_results(results, tmp_path / name)
    with pytest.raises(ValueError, match="unknown results file suffix"):
        read_results(tmp_path / name)
    assert not list(tmp_path.iterdir())


def test_bad_meta_and_names_refused_before_writing(results, tmp_path):
    t = results[:1].copy()
    t.meta["emulator"] = object()
    for suffix in (".fits", ".ecsv", ".h5"):
        with pytest.raises(TypeError, match="emulator"):
            write_results(t, tmp_path / f"r{suffix}")
    t = results[:1].copy()
    t.meta["flag_bits"] = {0: "not converged"}
    with pytest.raises(TypeError, match="only str keys"):
        write_results(t, tmp_path / "r.fits")
    t = results[:1].copy()
    t["Fe_H"] = t["[Fe/H]"]
    with pytest.raises(ValueError, match=r"'\[Fe/H\]' and 'Fe_H'.*'FE_H'"):
        write_results(t, tmp_path / "r.fits")
    write_results(t, tmp_path / "r.ecsv")  # ECSV keeps names: no collision
    assert [p.name for p in tmp_path.iterdir()] == ["r.ecsv"]


def test_newer_file_version_refused(results, tmp_path):
    path = write_results(results[:1], tmp_path / "r.fits")
    with fits.open(path, mode="update") as hdul:  # as a newer payne_lite writes it
        hdul[1].header[KEY_VERSION] = 99
        hdul[1].add_checksum()
    with pytest.raises(FileFormatError, match="version 99 is newer"):
        read_results(path)
    raw = path.read_bytes()  # edited by hand, the checksum not updated
    path.write_bytes(raw.replace(b"flags bit", b"flags BIT", 1))
    with pytest.raises(FileFormatError, match="Checksum verification failed"):
        read_results(path)


def test_foreign_fits_read_as_is(tmp_path):
    path = tmp_path / "other.fits"
    Table({"A": [1, 2], "B_ERR": [0.5, 0.25]}).write(path)
    back = read_results(path)
    assert back.colnames == ["A", "B_ERR"] and list(back["A"]) == [1, 2]


@pytest.mark.parametrize(
    ("label", "safe"),
    [
        ("Teff", "TEFF"),
        ("logg", "LOGG"),
        ("[Fe/H]", "FE_H"),
        ("[alpha/Fe]", "ALPHA_FE"),
        ("[Mg/Fe]", "MG_FE"),
        ("vmacro", "VMACRO"),
        ("rv", "RV"),
        ("Teff_err", "TEFF_ERR"),
        ("[Fe/H]_err", "FE_H_ERR"),
        ("[Mg/Fe]_p16", "MG_FE_P16"),
        ("[alpha/Fe]_p84", "ALPHA_FE_P84"),
        ("[Fe/H]_mdn_sigma", "FE_H_MDN_SIGMA"),
        ("logg_mdn", "LOGG_MDN"),
        ("v sin i", "V_SIN_I"),
    ],
)
def test_safe_column_name(label, safe):
    assert safe_column_name(label) == safe
    assert safe_column_name(safe) == safe  # idempotent


def test_safe_name_table_matches_rule():
    for label, safe in SAFE_NAME_EXAMPLES.items():
        assert safe_column_name(label) == safe
    with pytest.raises(ValueError, match="no ASCII letters or digits"):
        safe_column_name("[/]")
    with pytest.raises(TypeError, match="str"):
        safe_column_name(3)


def test_failed_write_leaves_no_temp_and_keeps_old_file(results, tmp_path, monkeypatch):
    path = write_results(results[:1], tmp_path / "r.fits")

    def boom(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr("payne_lite.catalog._results.os.replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_results(results, path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["r.fits"]
    assert len(read_results(path)) == 1


_FUZZ_CHILD = r"""
import json, sys, warnings
import numpy as np
from payne_lite import FileFormatError
from payne_lite.catalog import read_results
warnings.simplefilter("ignore")
ref = read_results(sys.argv[1])

def same(t):
    if t.colnames != ref.colnames or len(t) != len(ref) or t.meta != ref.meta:
        return False
    for c in ref.colnames:
        a, b = np.asarray(t[c]), np.asarray(ref[c])
        if a.shape != b.shape or str(t[c].unit) != str(ref[c].unit):
            return False
        if a.dtype.kind == "f":
            if not np.array_equal(a, b, equal_nan=True):
                return False
        elif not np.array_equal(a, b):
            return False
    return True

out = {}
for path in sys.argv[2:]:
    try:
        out[path] = "same" if same(read_results(path)) else "changed"
    except FileFormatError:
        out[path] = "refused"
    except Exception as err:
        out[path] = f"other: {type(err).__name__}: {err}"[:300]
print(json.dumps(out))
"""


def _damaged_copies(path, folder, rng, n_flip=12):
    """Truncated copies, copies with one bit flipped (in the first 4 kB, where the
    headers are, and anywhere), and copies with a 512-byte block zeroed."""
    data = path.read_bytes()
    cases = {}
    for frac in (0.1, 0.5, 0.9, 0.99):
        cases[f"truncated-{frac}"] = data[: int(len(data) * frac)]
    for i in range(n_flip):
        b = bytearray(data)
        pos = int(rng.integers(0, min(len(b), 4096) if i % 2 else len(b)))
        b[pos] ^= 1 << int(rng.integers(0, 8))
        cases[f"flip-{i}-at-{pos}"] = bytes(b)
    for i in range(4):
        b = bytearray(data)
        pos = int(rng.integers(0, max(len(b) - 512, 1)))
        b[pos : pos + 512] = bytes(min(512, len(b) - pos))
        cases[f"zeroed-{i}-at-{pos}"] = bytes(b)
    paths = []
    for name, raw in cases.items():
        p = folder / f"{name}{path.suffix}"
        p.write_bytes(raw)
        paths.append(p)
    return paths


def test_ecsv_whose_meta_key_is_damaged_is_refused(results, tmp_path):
    """A bit flip that turns the ECSV header's ``meta`` key into ``metA`` makes
    astropy read the table with no meta at all, checksum included (found by
    benchmarks/bench_fuzz.py: read as a foreign table, with changed content, before
    the fix): the header still names payne_lite's keys, so it is refused."""
    src = write_results(results, tmp_path / "r.ecsv")
    text = src.read_text()
    assert text.count("# meta: ") == 1
    src.write_text(text.replace("# meta: ", "# metA: "))
    with pytest.raises(FileFormatError, match="the file is damaged"):
        read_results(src)


@pytest.mark.parametrize("suffix", [".fits", ".ecsv", ".h5"])
def test_damaged_results_files_are_refused_or_read_unchanged(results, tmp_path, suffix):
    """Every damaged copy (truncated, a bit flipped, a block zeroed) raises
    FileFormatError or reads back exactly as written: never other values silently
    (before the checksums, 4 of 12 damaged FITS and HDF5 files were read with
    changed values). Read in a child process with a timeout: a hang or a crash
    fails the test too."""
    import subprocess
    import sys

    src = write_results(results, tmp_path / f"r{suffix}")
    bad = tmp_path / "bad"
    bad.mkdir()
    paths = _damaged_copies(src, bad, np.random.default_rng(7))
    proc = subprocess.run(
        [sys.executable, "-c", _FUZZ_CHILD, str(src), *map(str, paths)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(got) == len(paths)
    wrong = {k: v for k, v in got.items() if v not in ("refused", "same")}
    assert not wrong, wrong
    assert sum(v == "refused" for v in got.values()) >= len(paths) // 2
