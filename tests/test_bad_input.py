"""Bad input at every entry point, as one table (issue 8, item 4).

Each row of ``CASES`` names an entry point, the bad input and what it gets:

* ``Raises(type, regex)``: a clear one-line error naming the argument, what was found
  and what was expected;
* ``Flagged(rows, bits)``: the call succeeds, the bad rows carry the flag bits with NaN
  results, and every other star is fitted normally (a bad star never stops the rest);
* ``Warns(category, regex, n)``: the call succeeds after exactly ``n`` warnings;
* ``Exit(code, regex)``: the ``payne-lite`` command exits with ``code`` and one line on
  stderr (an error, or a warning when the command succeeds).

Everything runs on a 60-pixel random emulator (``conftest.build_tiny_emulator``) and
files made from it in a temporary folder; nothing needs the real data.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from astropy.io import fits
from conftest import build_tiny_emulator, restamp

import payne_lite as pl
from payne_lite.cli import main
from payne_lite.fitting import FLAG_FAILED, FLAG_NOT_CONVERGED

FAILED = FLAG_FAILED | FLAG_NOT_CONVERGED  # a row with no usable fit: flags 5
TRUTH = np.array([[5000.0, 3.0, -0.5], [5500.0, 4.0, 0.0], [6000.0, 2.0, -1.0]])
N_PIX = 60


# --------------------------------------------------------------------------------------
# Expectations
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Raises:
    exc: type[BaseException]
    match: str


@dataclasses.dataclass(frozen=True)
class Flagged:
    rows: tuple[int, ...]  # rows that must be flagged with ``bits`` and NaN labels
    bits: int = FAILED


@dataclasses.dataclass(frozen=True)
class Warns:
    category: type[Warning]
    match: str
    n: int = 1


@dataclasses.dataclass(frozen=True)
class Exit:
    code: int
    match: str  # one stderr line matches this


# --------------------------------------------------------------------------------------
# Shared inputs
# --------------------------------------------------------------------------------------
def _corrupt_largest_dataset(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` with the bytes of the first chunk of its largest chunked
    dataset overwritten (its Fletcher-32 checksum must catch it)."""
    best = None
    with h5py.File(src, "r") as f:

        def visit(name, obj):
            nonlocal best
            if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
                info = obj.id.get_chunk_info(0)
                if best is None or info.size > best[1]:
                    best = (info.byte_offset, info.size, name)

        f.visititems(visit)
    assert best is not None, src
    data = bytearray(src.read_bytes())
    off, size, _ = best
    data[off : off + size] = bytes((b ^ 0x5A) for b in data[off : off + size])
    dst.write_bytes(bytes(data))


def _bad_variants(path: Path) -> dict[str, Path]:
    """Truncated, corrupted, not-HDF5 and future-version copies of an HDF5 file."""
    raw = path.read_bytes()
    out = {}
    out["truncated"] = path.with_name(f"{path.stem}_truncated.h5")
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    out["corrupt"] = path.with_name(f"{path.stem}_corrupt.h5")
    _corrupt_largest_dataset(path, out["corrupt"])
    out["text"] = path.with_name(f"{path.stem}_text.h5")
    out["text"].write_text("not an HDF5 file\n")
    out["v99"] = path.with_name(f"{path.stem}_v99.h5")
    out["v99"].write_bytes(raw)
    with h5py.File(out["v99"], "a") as f:
        f.attrs["format_version"] = 99
    restamp(out["v99"])
    return out


def _write_fits_star(path: Path, flux, err, wave) -> Path:
    hdr = fits.Header()
    hdr["CRVAL1"], hdr["CDELT1"], hdr["CRPIX1"] = float(wave[0]), 0.2, 1
    hdr["CTYPE1"], hdr["DC-FLAG"] = "LINEAR", 0
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(np.asarray(flux, np.float32), header=hdr, name="FLUX"),
            fits.ImageHDU(np.asarray(err, np.float32), name="ERROR"),
        ]
    ).writeto(path)
    return path


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> SimpleNamespace:
    d = tmp_path_factory.mktemp("bad_input")
    emu = build_tiny_emulator(n_pix=N_PIX)
    flux = np.asarray(emu.predict(TRUTH), np.float64)
    err = np.full_like(flux, 0.01)
    mdn = pl.train_mdn(
        emu, n_train=300, n_valid=60, epochs=2, n_pca=4, hidden=(8,), progress=False
    )
    emu.save(d / "emu.h5")
    mdn.save(d / "mdn.h5")
    grid = pl.SpectralGrid(
        wavelength=emu.wavelength,
        labels=np.vstack([TRUTH, TRUTH + [100.0, 0.1, 0.1]]),
        flux=np.vstack([flux, flux]),
        label_names=emu.label_names,
        label_units=emu.label_units,
    )
    grid.save(d / "grid.h5")
    pl.write_catalog(d / "cat.h5", flux, err, emu.wavelength)
    # six stars: row 2 all-NaN flux, row 4 negative errors
    f6, e6 = np.vstack([flux, flux]), np.vstack([err, err])
    f6[2], e6[4] = np.nan, -1.0
    pl.write_catalog(d / "cat_badstars.h5", f6, e6, emu.wavelength)
    pl.write_catalog(d / "cat_shifted.h5", flux, err, emu.wavelength + 0.05)
    pl.write_catalog(d / "cat_far.h5", flux, err, emu.wavelength + 1000.0)
    with h5py.File(d / "cat_empty.h5", "w") as f:  # as another tool might write it
        f.attrs["format"], f.attrs["format_version"] = "payne_lite.Catalog", 1
        f["wavelength"] = emu.wavelength
        f["flux"] = np.zeros((0, N_PIX))
        f["flux_err"] = np.zeros((0, N_PIX))
    fits_ok = [
        _write_fits_star(d / f"star{i}.fits", flux[i], err[i], emu.wavelength)
        for i in range(3)
    ]
    fits_nan = _write_fits_star(
        d / "star_nan.fits", np.full(N_PIX, np.nan), err[0], emu.wavelength
    )
    raw = fits_ok[0].read_bytes()
    (d / "star_truncated.fits").write_bytes(raw[: len(raw) // 2])
    bad = {k: _bad_variants(d / f"{k}.h5") for k in ("emu", "mdn", "grid", "cat")}
    return SimpleNamespace(
        dir=d,
        emu=emu,
        mdn=mdn,
        flux=flux,
        err=err,
        bad=bad,
        fits_ok=fits_ok,
        fits_nan=fits_nan,
        n_out=iter(range(10_000)),
    )


# --------------------------------------------------------------------------------------
# Entry points: each takes the shared context and one case's parameters
# --------------------------------------------------------------------------------------
def _fit(c, *, flux=None, err=None, **kw):
    f = c.flux.copy() if flux is None else flux(c.flux.copy())
    e = c.err.copy() if err is None else err(c.err.copy())
    kw = {k: (v(c) if callable(v) else v) for k, v in kw.items()}
    return pl.fit(f, e, c.emu, options=pl.LMOptions(n_threads=1), **kw)


def _out(c, suffix=".fits") -> Path:
    return c.dir / f"out{next(c.n_out)}{suffix}"


def _fit_catalog(c, *, source, **kw):
    src = source(c) if callable(source) else c.dir / source
    kw = {k: (v(c) if callable(v) else v) for k, v in kw.items()}
    out = _out(c)
    emu = kw.pop("emulator", c.emu)
    return pl.fit_catalog(
        src, out, emu, progress=False, options=pl.LMOptions(n_threads=1), **kw
    )


def _mdn_predict(c, *, flux=None, err=None, **kw):
    f = c.flux.copy() if flux is None else flux(c.flux.copy())
    e = c.err.copy() if err is None else err(c.err.copy())
    kw = {k: (v(c) if callable(v) else v) for k, v in kw.items()}
    return c.mdn.predict(f, e, n_threads=1, **kw)


def _load(c, *, loader, file, kind):
    path = c.bad[file][kind] if kind else c.dir / f"{file}.h5"
    return {
        "Emulator.load": pl.Emulator.load,
        "MDN.load": pl.MDN.load,
        "SpectralGrid.load": pl.SpectralGrid.load,
        "open_catalog": lambda p: len(pl.open_catalog(p)),
    }[loader](path)


def _grid(c, *, flux):
    return pl.SpectralGrid(
        wavelength=c.emu.wavelength,
        labels=TRUTH,
        flux=flux(c.flux.copy()),
        label_names=c.emu.label_names,
        label_units=c.emu.label_units,
    )


def _cli(c, *, argv):
    args = [str(a) for a in (argv(c) if callable(argv) else argv)]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def _rows(flux_fn):
    return flux_fn


def _set_row(row, value):
    def f(a):
        a[row] = value
        return a

    return f


def _set(index, value):
    def f(a):
        a[index] = value
        return a

    return f


def _mask_row(row):
    def m(c):
        mask = np.zeros(c.flux.shape, bool)
        mask[row] = True
        return mask

    return m


def _cli_fit(c, catalog, *extra, emulator=None):
    return [
        "fit",
        c.dir / catalog if isinstance(catalog, str) else catalog,
        "--emulator",
        emulator or c.dir / "emu.h5",
        "-o",
        _out(c),
        "--no-progress",
        *extra,
    ]


ENTRY: dict[str, Callable] = {
    "fit": _fit,
    "fit_catalog": _fit_catalog,
    "MDN.predict": _mdn_predict,
    "load": _load,
    "SpectralGrid": _grid,
    "cli": _cli,
}


@dataclasses.dataclass(frozen=True)
class Case:
    entry: str
    what: str
    kw: dict
    expect: Raises | Flagged | Warns | Exit


CASES = [
    # ---- fit: bad stars are flagged, the others fitted ------------------------------
    Case("fit", "NaN flux (one star)", dict(flux=_set_row(1, np.nan)), Flagged((1,))),
    Case("fit", "inf flux (one star)", dict(flux=_set_row(1, np.inf)), Flagged((1,))),
    Case("fit", "zero errors (one star)", dict(err=_set_row(0, 0.0)), Flagged((0,))),
    Case("fit", "negative errors", dict(err=_set_row(2, -0.01)), Flagged((2,))),
    Case("fit", "NaN errors", dict(err=_set_row(1, np.nan)), Flagged((1,))),
    Case("fit", "all pixels masked (one star)", dict(mask=_mask_row(1)), Flagged((1,))),
    Case(
        "fit",
        "all pixels masked (every star)",
        dict(mask=np.ones(N_PIX, bool)),
        Flagged((0, 1, 2)),
    ),
    # ---- fit: wrong shapes and values refused ---------------------------------------
    Case(
        "fit",
        "spectrum of the wrong length",
        dict(flux=lambda a: a[:, :50], err=lambda a: a[:, :50]),
        Raises(ValueError, r"flux \(3, 50\) has 50 pixels.*expected \(n_spec, 60\)"),
    ),
    Case(
        "fit",
        "flux_err shape differs",
        dict(err=lambda a: a[:, :50]),
        Raises(ValueError, r"flux \(3, 60\) and flux_err \(3, 50\) must have the same"),
    ),
    Case(
        "fit",
        "no spectra",
        dict(flux=lambda a: a[:0], err=lambda a: a[:0]),
        Raises(ValueError, r"flux \(0, 60\) holds no spectra"),
    ),
    Case(
        "fit",
        "mask not boolean",
        dict(mask=np.zeros(N_PIX)),
        Raises(ValueError, r"mask must be boolean \(True = ignore\), got float64"),
    ),
    Case(
        "fit",
        "mask of the wrong shape",
        dict(mask=np.zeros(50, bool)),
        Raises(ValueError, r"mask \(50,\) must be \(60,\) or the shape of flux"),
    ),
    Case(
        "fit",
        "wavelength: same length, not the emulator's",
        dict(wavelength=lambda c: c.emu.wavelength + 0.05),
        Warns(
            pl.WavelengthGridWarning,
            r"wavelength has the emulator's 60 pixels but is not the emulator's "
            r"grid \(max \|difference\| 0\.05 A",
        ),
    ),
    Case(
        "fit",
        "wavelength: another length covering the range (resampled)",
        dict(
            wavelength=lambda c: np.linspace(15100.0, 15111.8, N_PIX)[:-1],
            flux=lambda a: a[:, :-1],
            err=lambda a: a[:, :-1],
        ),
        Warns(pl.WavelengthGridWarning, "", n=0),
    ),
    Case(
        "fit",
        "wavelength: no overlap",
        dict(wavelength=lambda c: c.emu.wavelength + 1e3),
        Raises(
            ValueError,
            r"wavelength grid \[16100, 16111\.8\] A \(60 pixels\) does "
            r"not overlap the emulator's \[15100, 15111\.8\] A",
        ),
    ),
    Case(
        "fit",
        "wavelength: decreasing",
        dict(wavelength=lambda c: c.emu.wavelength[::-1]),
        Raises(ValueError, r"wavelength must be strictly increasing"),
    ),
    Case(
        "fit",
        "fixed= outside the training box",
        dict(fixed={"Teff": 9000.0}),
        Raises(
            ValueError, r"fixed: Teff = 9000 is outside the training box \[4000, 7000\]"
        ),
    ),
    Case(
        "fit",
        "fixed= NaN",
        dict(fixed={"logg": np.nan}),
        Raises(ValueError, r"fixed: logg = nan is not finite"),
    ),
    Case(
        "fit",
        "fixed= unknown label",
        dict(fixed={"vturb": 3.0}),
        Raises(ValueError, r"fixed: unknown parameter 'vturb'; valid names are"),
    ),
    Case(
        "fit",
        "fixed rv outside rv_range",
        dict(fixed={"rv": 900.0}),
        Raises(ValueError, r"fixed: rv = 900 km/s is outside rv_range"),
    ),
    Case(
        "fit",
        "p0 outside the training box",
        dict(p0=[9000.0, 3.0, 0.0]),
        Raises(
            ValueError,
            r"^p0\[0\] Teff = 9000 is outside the training box "
            r"\[4000, 7000\] \(1 row\(s\) outside\)$",
        ),
    ),
    Case(
        "fit",
        "p0 NaN",
        dict(p0=[5000.0, np.nan, 0.0]),
        Raises(ValueError, r"p0 has 1 non-finite value\(s\); first at index \(0, 1\)"),
    ),
    Case(
        "fit",
        "p0 of the wrong length",
        dict(p0=[5000.0, 3.0]),
        Raises(ValueError, r"p0 \(2,\) must have 3 columns \(Teff, logg, \[Fe/H\]\)"),
    ),
    Case(
        "fit",
        "p0 rows != stars",
        dict(p0=np.tile([5000.0, 3.0, 0.0], (2, 1))),
        Raises(ValueError, r"p0 \(2, 3\) must be \(3,\) or \(3, 3\)"),
    ),
    Case(
        "fit",
        "with an MDN: a same-length grid that is not the MDN's",
        dict(mdn=lambda c: c.mdn, wavelength=lambda c: c.emu.wavelength + 0.05),
        Raises(
            ValueError,
            r"MDN trained on a wavelength grid of 60 pixels .*\(max "
            r"\|difference\| 0\.05 A\)",
        ),
    ),
    Case(
        "fit",
        "rv_range empty (user bounds)",
        dict(rv_range=(100.0, -100.0)),
        Raises(
            ValueError, r"rv_range must be \(lo, hi\) \[km/s\], finite, with lo < hi"
        ),
    ),
    # ---- fit_catalog ----------------------------------------------------------------
    Case(
        "fit_catalog",
        "NaN-flux and negative-error stars in a catalog",
        dict(source="cat_badstars.h5", chunk_size=2),
        Flagged((2, 4)),
    ),
    Case(
        "fit_catalog",
        "a FITS star with NaN flux among good ones",
        dict(source=lambda c: [c.fits_ok[0], c.fits_nan, c.fits_ok[2]]),
        Flagged((1,)),
    ),
    Case(
        "fit_catalog",
        "empty catalog",
        dict(source="cat_empty.h5"),
        Raises(pl.FileFormatError, r"cat_empty\.h5: the catalog holds no spectra"),
    ),
    Case(
        "fit_catalog",
        "truncated catalog",
        dict(source=lambda c: c.bad["cat"]["truncated"]),
        Raises(
            pl.FileFormatError, r"not a readable HDF5 file \(corrupt or truncated\?\)"
        ),
    ),
    Case(
        "fit_catalog",
        "corrupt catalog rows",
        dict(source=lambda c: c.bad["cat"]["corrupt"]),
        Raises(pl.FileFormatError, r"rows \[0, 3\) are corrupt or unreadable"),
    ),
    Case(
        "fit_catalog",
        "catalog of another format version",
        dict(source=lambda c: c.bad["cat"]["v99"]),
        Raises(
            pl.FileFormatError,
            r"payne_lite\.Catalog format_version=99 is not "
            r"supported \(this payne_lite reads \[1, 2, 3\]\)",
        ),
    ),
    Case(
        "fit_catalog",
        "not a catalog (a grid file)",
        dict(source="grid.h5"),
        Raises(
            pl.FileFormatError,
            r"expected a 'payne_lite\.Catalog' file, found "
            r"format='payne_lite\.SpectralGrid'",
        ),
    ),
    Case(
        "fit_catalog",
        "truncated FITS star",
        dict(source=lambda c: [c.fits_ok[0], c.dir / "star_truncated.fits"]),
        Raises(
            pl.FileFormatError,
            r"star_truncated\.fits: truncated or corrupt FITS "
            r"file \(File may have been truncated",
        ),
    ),
    Case(
        "fit_catalog",
        "wavelength: same length, not the emulator's (warned once)",
        dict(source="cat_shifted.h5", chunk_size=1),
        Warns(
            pl.WavelengthGridWarning,
            r"cat_shifted\.h5: wavelength has the "
            r"emulator's 60 pixels but is not",
            n=1,
        ),
    ),
    Case(
        "fit_catalog",
        "wavelength: no overlap",
        dict(source="cat_far.h5"),
        Raises(ValueError, r"does not overlap the emulator's"),
    ),
    Case(
        "fit_catalog",
        "p0 row outside the box (global row, before any fit)",
        dict(
            source="cat_badstars.h5",
            chunk_size=2,
            p0=_set((3, 0), 9000.0)(np.tile([5000.0, 3.0, 0.0], (6, 1))),
        ),
        Raises(ValueError, r"^p0\[3\] Teff = 9000 is outside the training box"),
    ),
    Case(
        "fit_catalog",
        "fixed= outside the box",
        dict(source="cat.h5", fixed={"[Fe/H]": 2.0}),
        Raises(ValueError, r"fixed: \[Fe/H\] = 2 is outside the training box"),
    ),
    Case(
        "fit_catalog",
        "emulator file of another format version",
        dict(source="cat.h5", emulator=lambda c: c.bad["emu"]["v99"]),
        Raises(
            pl.FileFormatError,
            r"emu_v99\.h5: payne_lite\.Emulator "
            r"format_version=99 is not supported",
        ),
    ),
    # ---- MDN.predict: bad rows are NaN, the others answered --------------------------
    Case(
        "MDN.predict",
        "NaN flux (one star)",
        dict(flux=_set_row(1, np.nan)),
        Flagged((1,)),
    ),
    Case(
        "MDN.predict",
        "zero errors (one star)",
        dict(err=_set_row(0, 0.0)),
        Flagged((0,)),
    ),
    Case(
        "MDN.predict",
        "all pixels masked",
        dict(mask=np.ones(N_PIX, bool)),
        Flagged((0, 1, 2)),
    ),
    Case(
        "MDN.predict",
        "spectrum of the wrong length",
        dict(flux=lambda a: a[:, :50], err=lambda a: a[:, :50]),
        Raises(
            ValueError,
            r"flux \(3, 50\) and flux_err \(3, 50\) must both be "
            r"\(n_spec, 60\) or \(60,\) \(the MDN's wavelength grid\)",
        ),
    ),
    Case(
        "MDN.predict",
        "another wavelength grid of the same length",
        dict(wavelength=lambda c: c.emu.wavelength + 0.05),
        Raises(
            ValueError,
            r"resample the spectra onto the MDN's grid .*\(max "
            r"\|difference\| 0\.05 A\)",
        ),
    ),
    Case(
        "MDN.predict",
        "flux not numeric",
        dict(flux=lambda a: np.full(a.shape, "x")),
        Raises(ValueError, r"flux must be a numeric \(n_spec, 60\) array"),
    ),
    # ---- loaders --------------------------------------------------------------------
    *[
        Case(
            "load",
            f"{loader}: {kind} file",
            dict(loader=loader, file=file, kind=kind),
            Raises(exc, rx),
        )
        for loader, file, fmt, ver in (
            ("Emulator.load", "emu", "Emulator", "1, 2, 3, 4"),
            ("MDN.load", "mdn", "MDN", "2, 3"),
            ("SpectralGrid.load", "grid", "SpectralGrid", 1),
            ("open_catalog", "cat", "Catalog", "1, 2, 3"),
        )
        for kind, exc, rx in (
            (
                "truncated",
                pl.FileFormatError,
                # stamped files: their checksum block; catalogs: libhdf5's report
                r"corrupt or truncated(: its bytes do not match the checksum|"
                r"\?\): .*truncated file)",
            ),
            (
                "text",
                pl.FileFormatError,
                r"not a readable HDF5 file .*(file signature not found|neither "
                r"payne_lite's checksum block nor the HDF5 signature)",
            ),
            (
                "v99",
                pl.FileFormatError,
                rf"payne_lite\.{fmt} format_version=99 is not "
                rf"supported \(this payne_lite reads \[{ver}\]\)",
            ),
            ("corrupt", pl.FileFormatError, r"corrupt"),
        )
        if not (loader == "open_catalog" and kind == "corrupt")  # rows read lazily
    ],
    Case(
        "load",
        "Emulator.load: a grid file",
        dict(loader="Emulator.load", file="grid", kind=None),
        Raises(
            pl.FileFormatError,
            r"expected a 'payne_lite\.Emulator' "
            r"file, found format='payne_lite\.SpectralGrid'",
        ),
    ),
    Case(
        "SpectralGrid",
        "a grid with a NaN flux row",
        dict(flux=_set_row(1, np.nan)),
        Raises(
            ValueError,
            r"flux has 60 non-finite value\(s\); first at index "
            r"\(1, 0\): nan",
        ),
    ),
    # ---- the command line -----------------------------------------------------------
    Case(
        "cli",
        "fit: a catalog with bad stars (flagged, the rest fitted)",
        dict(argv=lambda c: _cli_fit(c, "cat_badstars.h5")),
        Exit(0, r"^  \d converged, 2 flagged \(.*2 failed"),
    ),
    Case(
        "cli",
        "fit: an empty catalog",
        dict(argv=lambda c: _cli_fit(c, "cat_empty.h5")),
        Exit(2, r"^payne-lite: error: .*cat_empty\.h5: the catalog holds no spectra$"),
    ),
    Case(
        "cli",
        "fit: a truncated emulator file",
        dict(argv=lambda c: _cli_fit(c, "cat.h5", emulator=c.bad["emu"]["truncated"])),
        Exit(2, r"^payne-lite: error: .*emu_truncated\.h5: corrupt or truncated"),
    ),
    Case(
        "cli",
        "fit: an emulator of another format version",
        dict(argv=lambda c: _cli_fit(c, "cat.h5", emulator=c.bad["emu"]["v99"])),
        Exit(2, r"^payne-lite: error: .*format_version=99 is not supported"),
    ),
    Case(
        "cli",
        "fit: --fixed outside the box",
        dict(argv=lambda c: _cli_fit(c, "cat.h5", "--fixed", "Teff=9000")),
        Exit(2, r"^payne-lite: error: fixed: Teff = 9000 is outside the training box"),
    ),
    Case(
        "cli",
        "fit: a catalog on a shifted grid of the emulator's length (warning)",
        dict(argv=lambda c: _cli_fit(c, "cat_shifted.h5")),
        Exit(
            0,
            r"^payne-lite: warning: .*cat_shifted\.h5: wavelength has the "
            r"emulator's 60 pixels but is not the emulator's grid",
        ),
    ),
    Case(
        "cli",
        "train: a grid of another format version",
        dict(
            argv=lambda c: [
                "train",
                c.bad["grid"]["v99"],
                "-o",
                _out(c, ".h5"),
                "--no-progress",
            ]
        ),
        Exit(2, r"^payne-lite: error: .*format_version=99 is not supported"),
    ),
    Case(
        "cli",
        "train: a corrupt grid",
        dict(
            argv=lambda c: [
                "train",
                c.bad["grid"]["corrupt"],
                "-o",
                _out(c, ".h5"),
                "--no-progress",
            ]
        ),
        Exit(2, r"^payne-lite: error: .*grid_corrupt\.h5: .*corrupt"),
    ),
    Case(
        "cli",
        "predict: labels outside the training box",
        dict(
            argv=lambda c: [
                "predict",
                c.dir / "emu.h5",
                "--labels",
                "9000,3,0",
                "-o",
                _out(c, ".npy"),
            ]
        ),
        Exit(
            2,
            r"^payne-lite: error: label row 0: Teff = 9000 is outside the "
            r"emulator's training box \[4000, 7000\] K",
        ),
    ),
    Case(
        "cli",
        "train-mdn: an emulator of another format version",
        dict(
            argv=lambda c: [
                "train-mdn",
                c.bad["emu"]["v99"],
                "-o",
                _out(c, ".h5"),
                "--no-progress",
            ]
        ),
        Exit(2, r"^payne-lite: error: .*payne_lite\.Emulator format_version=99"),
    ),
    Case(
        "cli",
        "fit: a truncated FITS star",
        dict(argv=lambda c: _cli_fit(c, c.dir / "star_truncated.fits")),
        Exit(2, r"^payne-lite: error: .*star_truncated\.fits: truncated or corrupt"),
    ),
    Case(
        "cli",
        "train: --resume without --checkpoint",
        dict(
            argv=lambda c: [
                "train",
                c.dir / "grid.h5",
                "-o",
                _out(c, ".h5"),
                "--resume",
                "--no-progress",
            ]
        ),
        Exit(2, r"^payne-lite: error: --resume needs --checkpoint CKPT\.h5$"),
    ),
]


def _case_id(case: Case) -> str:
    return f"{case.entry}-{case.what}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_bad_input(ctx, case):
    run = lambda: ENTRY[case.entry](ctx, **case.kw)  # noqa: E731
    exp = case.expect
    if isinstance(exp, Raises):
        with pytest.raises(exp.exc) as info:
            run()
        msg = str(info.value)
        assert "\n" not in msg, msg
        assert re.search(exp.match, msg), msg
    elif isinstance(exp, Warns):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = run()
        ours = [w for w in caught if issubclass(w.category, exp.category)]
        assert len(ours) == exp.n, [str(w.message) for w in caught]
        for w in ours:
            assert re.search(exp.match, str(w.message)), str(w.message)
            assert "\n" not in str(w.message)
        _assert_fitted(result, range(len(result)))
    elif isinstance(exp, Flagged):
        result = run()
        if case.entry == "MDN.predict":
            mean, sigma = result
            bad = np.zeros(len(mean), bool)
            bad[list(exp.rows)] = True
            assert np.all(np.isnan(mean[bad])) and np.all(np.isnan(sigma[bad]))
            assert np.all(np.isfinite(mean[~bad])) and np.all(sigma[~bad] > 0)
            return
        flags = np.asarray(result["flags"])
        bad = np.zeros(len(result), bool)
        bad[list(exp.rows)] = True
        assert np.all(flags[bad] & exp.bits == exp.bits), flags
        assert np.all(np.asarray(result["n_good_pixels"])[bad] == 0)
        for name in ctx.emu.label_names:
            assert np.all(np.isnan(np.asarray(result[name])[bad])), name
        _assert_fitted(result, np.flatnonzero(~bad))
    elif isinstance(exp, Exit):
        code, out, err = run()
        assert code == exp.code, (out, err)
        assert "Traceback" not in err
        lines = (
            err.strip().splitlines()
            if code
            else (err.strip().splitlines() or out.splitlines())
        )
        if code:
            assert len(lines) == 1, err
        assert any(re.search(exp.match, ln) for ln in lines + out.splitlines()), (
            out,
            err,
        )
    else:  # pragma: no cover
        raise TypeError(exp)


def _assert_fitted(table, rows) -> None:
    """The given rows are fitted normally: converged, no failure, labels near the
    truth (the catalogs repeat the three truth spectra)."""
    rows = list(rows)
    if not rows:
        return
    flags = np.asarray(table["flags"])[rows]
    assert np.all(flags & FLAG_FAILED == 0), flags
    assert np.all(np.asarray(table["converged"])[rows]), flags
    truth = np.vstack([TRUTH, TRUTH])[rows]
    teff = np.asarray(table["Teff"])[rows]
    np.testing.assert_allclose(teff, truth[:, 0], atol=30.0)


def test_cli_fit_warning_printed_once_as_one_line(ctx):
    """A catalog fitted in several chunks warns once, in the CLI's one-line form."""
    code, _, err = _cli(ctx, argv=_cli_fit(ctx, "cat_shifted.h5", "--chunk-size", "1"))
    assert code == 0
    warned = [ln for ln in err.splitlines() if ln.startswith("payne-lite: warning:")]
    assert len(warned) == 1, err


def test_fit_catalog_bad_p0_leaves_nothing_behind(ctx):
    """A bad p0 row is refused before any chunk is fitted: no parts, no output."""
    out = _out(ctx)
    p0 = np.tile([5000.0, 3.0, 0.0], (6, 1))
    p0[5, 1] = np.nan
    with pytest.raises(
        ValueError,
        match=r"^p0 has 1 non-finite value\(s\); first at "
        r"index \(5, 1\)",
    ):
        pl.fit_catalog(
            ctx.dir / "cat_badstars.h5",
            out,
            ctx.emu,
            p0=p0,
            chunk_size=2,
            progress=False,
        )
    assert not out.exists()
    assert not pl.catalog.parts_folder(out).exists()


def test_train_emulator_refuses_a_grid_changed_in_place(ctx):
    """SpectralGrid validates on construction; train_emulator checks again, so a NaN
    written into the arrays later is named before any training."""
    grid = pl.SpectralGrid.load(ctx.dir / "grid.h5")
    flux = np.array(grid.flux)
    flux[4, 7] = np.nan
    object.__setattr__(grid, "flux", flux)
    with pytest.raises(
        ValueError, match=r"flux has 1 non-finite value\(s\); first at index"
    ):
        pl.train_emulator(grid, hidden=2, max_iter=2, progress=False)
