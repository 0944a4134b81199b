"""Tests of payne_lite.catalog: the HDF5 catalog layout, the APOGEE FITS reader and
fit_catalog (whose results must equal fit() on the same arrays).

Emulators are the small random ones of conftest (60 pixels, 3 labels), so that the
fits compile and run in seconds.
"""

from __future__ import annotations

import importlib.util
import json

import h5py
import numpy as np
import pytest
from astropy.io import fits
from conftest import interrupt_chunk, redigest_catalog

import payne_lite as pl
from payne_lite import FileFormatError
from payne_lite.catalog import (
    APOGEE_BAD_PIXEL_BITS,
    ApogeeFitsCatalog,
    HDF5Catalog,
    catalog_writer,
    chunk_bounds,
    read_apogee_fits,
)

N_SPEC, N_PIX = 20, 60
APOGEE_CRVAL1, APOGEE_CDELT1, APOGEE_NPIX = 4.179, 6e-6, 8575


def spectra(emu, n, *, seed=0, snr=50.0, dtype=np.float32):
    """(labels, flux, flux_err) of n noisy spectra inside the emulator's box."""
    rng = np.random.default_rng(seed)
    lo, hi = emu.label_lo, emu.label_hi
    labels = lo + (hi - lo) * rng.uniform(0.15, 0.85, (n, emu.n_labels))
    clean = emu.predict(labels).astype(np.float64)
    err = np.full_like(clean, 1.0 / snr) * rng.uniform(0.8, 1.2, clean.shape)
    flux = clean + err * rng.normal(size=clean.shape)
    return labels, flux.astype(dtype), err.astype(dtype)


@pytest.fixture(scope="module")
def emu():
    from conftest import build_tiny_emulator

    return build_tiny_emulator(n_pix=N_PIX, n_hid=3, seed=3)


@pytest.fixture(scope="module")
def data(emu):
    _, flux, err = spectra(emu, N_SPEC)
    mask = np.zeros(flux.shape, bool)
    mask[2, 10:30] = True
    mask[7, :] = True  # a spectrum with no usable pixel: flagged "failed"
    ids = np.array([f"2M{i:08d}+{i:07d}" for i in range(N_SPEC)])
    return flux, err, mask, ids


@pytest.fixture(scope="module")
def cat_path(tmp_path_factory, emu, data):
    path = tmp_path_factory.mktemp("cat") / "catalog.h5"
    flux, err, mask, ids = data
    pl.write_catalog(path, flux, err, emu.wavelength, mask=mask, ids=ids, meta={"a": 1})
    return path


# --- the HDF5 layout --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_write_read_round_trip(tmp_path, emu, dtype):
    _, flux, err = spectra(emu, 5, dtype=dtype)
    path = pl.write_catalog(tmp_path / "c.h5", flux, err, emu.wavelength)
    with pl.open_catalog(path) as cat:
        assert isinstance(cat, HDF5Catalog)
        assert len(cat) == 5 and not cat.has_mask and not cat.has_ids
        np.testing.assert_array_equal(cat.wavelength, emu.wavelength)
        chunk = cat.read(0, 5)
    assert chunk.flux.dtype == dtype and chunk.flux_err.dtype == dtype
    np.testing.assert_array_equal(chunk.flux, flux)
    np.testing.assert_array_equal(chunk.flux_err, err)
    assert chunk.mask is None and chunk.ids is None


def test_layout_is_versioned_and_chunked_along_rows(cat_path, data):
    flux, err, mask, ids = data
    with h5py.File(cat_path, "r") as f:
        assert f.attrs["format"] == "payne_lite.Catalog"
        assert f.attrs["format_version"] == 3
        assert f.id.get_create_plist().get_version()[0] >= 2  # metadata checksums
        assert f["wavelength"].fletcher32
        for name in ("flux", "flux_err", "mask"):
            ds = f[name]
            assert ds.shape == (N_SPEC, N_PIX)
            assert ds.chunks[1] == N_PIX  # a storage chunk holds whole rows
            assert ds.fletcher32
        assert f["mask"].dtype == bool
        assert list(f["ids"].asstr()[()]) == list(ids)
    with pl.open_catalog(cat_path) as cat:
        assert cat.meta == {"a": 1}
        got = cat.read(3, 11)
    np.testing.assert_array_equal(got.flux, flux[3:11])
    np.testing.assert_array_equal(got.flux_err, err[3:11])
    np.testing.assert_array_equal(got.mask, mask[3:11])
    assert list(got.ids) == list(ids[3:11])


def test_iter_catalog_uneven_chunks(cat_path, data):
    flux, err, mask, ids = data
    starts, parts = zip(*pl.iter_catalog(cat_path, chunk_size=8), strict=True)
    assert starts == (0, 8, 16)
    assert [len(p.flux) for p in parts] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate([p.flux for p in parts]), flux)
    np.testing.assert_array_equal(np.concatenate([p.flux_err for p in parts]), err)
    np.testing.assert_array_equal(np.concatenate([p.mask for p in parts]), mask)
    assert list(np.concatenate([p.ids for p in parts])) == list(ids)
    assert chunk_bounds(20, 8) == [(0, 8), (8, 16), (16, 20)]
    assert chunk_bounds(16, 8) == [(0, 8), (8, 16)]


def test_catalog_writer_appends_blocks_and_leaves_nothing_on_error(
    tmp_path, cat_path, emu, data
):
    flux, err, mask, ids = data
    path = tmp_path / "blocks.h5"
    with catalog_writer(path, emu.wavelength, with_mask=True, with_ids=True) as w:
        for s, e in [(0, 7), (7, 8), (8, 20)]:
            w.append(flux[s:e], err[s:e], mask=mask[s:e], ids=ids[s:e])
    with pl.open_catalog(path) as a, pl.open_catalog(cat_path) as b:
        x, y = a.read(0, N_SPEC), b.read(0, N_SPEC)
    for u, v in zip(x, y, strict=True):
        np.testing.assert_array_equal(u, v)

    broken = tmp_path / "broken.h5"
    with pytest.raises(ValueError, match=r"flux \(2, 59\) has 59 pixels"):
        with catalog_writer(broken, emu.wavelength) as w:
            w.append(flux[:3], err[:3])
            w.append(flux[:2, :-1], err[:2, :-1])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blocks.h5"]  # no temp file


def test_inputs_not_mutated(tmp_path, emu, data):
    flux, err, mask, ids = data
    copies = [a.copy() for a in data]
    pl.write_catalog(tmp_path / "c.h5", flux, err, emu.wavelength, mask=mask, ids=ids)
    for a, b in zip(data, copies, strict=True):
        np.testing.assert_array_equal(a, b)


# --- bad input -------------------------------------------------------------------
def test_write_bad_input(tmp_path, emu, data):
    flux, err, mask, ids = data
    wave = emu.wavelength
    with pytest.raises(ValueError, match=r"flux \(20, 60\) and flux_err \(20, 59\)"):
        pl.write_catalog(tmp_path / "a.h5", flux, err[:, 1:], wave)
    with pytest.raises(ValueError, match="holds no spectra"):
        pl.write_catalog(tmp_path / "a.h5", flux[:0], err[:0], wave)
    with pytest.raises(ValueError, match=r"ids \(19,\) must be \(20,\)"):
        pl.write_catalog(tmp_path / "a.h5", flux, err, wave, ids=ids[1:])
    with pytest.raises(ValueError, match="mask must be boolean"):
        pl.write_catalog(tmp_path / "a.h5", flux, err, wave, mask=mask.astype(int))
    with pytest.raises(ValueError, match="strictly increasing"):
        pl.write_catalog(tmp_path / "a.h5", flux, err, wave[::-1])
    with pytest.raises(ValueError, match="no spectra were appended"):
        with catalog_writer(tmp_path / "a.h5", wave):
            pass
    pl.write_catalog(tmp_path / "a.h5", flux[:2], err[:2], wave)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        pl.write_catalog(tmp_path / "a.h5", flux[:2], err[:2], wave)
    assert not any(p.name.endswith(".tmp") for p in tmp_path.iterdir())


def _raw_catalog(path, wave, flux, err, version=1):
    """A catalog file written by hand (to make files write_catalog would refuse)."""
    with h5py.File(path, "w") as f:
        f.attrs["format"] = "payne_lite.Catalog"
        f.attrs["format_version"] = version
        f["wavelength"] = wave
        f["flux"] = flux
        f["flux_err"] = err


def test_read_bad_files(tmp_path, emu, cat_path, data):
    flux, err, _, _ = data
    wave = emu.wavelength
    with pytest.raises(FileNotFoundError, match="missing.h5: no such file"):
        pl.open_catalog(tmp_path / "missing.h5")
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file\n" * 20)
    with pytest.raises(FileFormatError, match="garbage.h5: not a readable HDF5 file"):
        pl.open_catalog(garbage)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(cat_path.read_bytes()[:2000])
    with pytest.raises(FileFormatError, match="truncated.h5"):
        pl.open_catalog(truncated)
    grid = tmp_path / "grid.h5"
    pl.SpectralGrid(
        wave, np.ones((2, 3)), flux[:2], ("a", "b", "c"), ("", "", "")
    ).save(grid)
    with pytest.raises(
        FileFormatError,
        match="expected a 'payne_lite.Catalog' file, found format="
        "'payne_lite.SpectralGrid'",
    ):
        pl.open_catalog(grid)
    _raw_catalog(tmp_path / "v9.h5", wave, flux, err, version=9)
    with pytest.raises(FileFormatError, match="format_version=9 is not supported"):
        pl.open_catalog(tmp_path / "v9.h5")
    _raw_catalog(tmp_path / "empty.h5", wave, flux[:0], err[:0])
    with pytest.raises(FileFormatError, match="empty.h5: the catalog holds no spectra"):
        pl.open_catalog(tmp_path / "empty.h5")
    _raw_catalog(tmp_path / "shape.h5", wave, flux, err[:5])
    with pytest.raises(
        FileFormatError,
        match=r"flux_err \(5, 60\) must have the shape of flux \(20, 60\)",
    ):
        pl.open_catalog(tmp_path / "shape.h5")
    _raw_catalog(tmp_path / "pix.h5", wave[:-1], flux, err)
    with pytest.raises(
        FileFormatError, match=r"flux \(20, 60\) must be \(n_spec, 59\)"
    ):
        pl.open_catalog(tmp_path / "pix.h5")
    with pytest.raises(ValueError, match="unknown catalog file type '.npz'"):
        pl.open_catalog(tmp_path / "c.npz")


def test_corrupt_rows_are_reported_not_read(tmp_path, cat_path):
    bad = tmp_path / "bitrot.h5"
    raw = bytearray(cat_path.read_bytes())
    with h5py.File(cat_path, "r") as f:
        info = f["flux"].id.get_chunk_info(0)
    for k in range(16):  # flip bits inside the first stored chunk of flux
        raw[info.byte_offset + 100 + k] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pl.open_catalog(bad) as cat:
        with pytest.raises(
            FileFormatError, match=r"bitrot.h5: rows \[0, 4\) are corrupt"
        ):
            cat.read(0, 4)


# --- APOGEE FITS ------------------------------------------------------------------
@pytest.fixture(scope="module")
def apogee_star(payne_data):
    """(pixel index k on the 8575-pixel grid, wavelength, flux, err) of a real APOGEE
    spectrum on the 7214-pixel grid (shipped in data/payne_apogee)."""
    spec = payne_data.combined_spectrum()
    wave = spec.wavelength
    k = np.rint((np.log10(wave) - APOGEE_CRVAL1) / APOGEE_CDELT1).astype(int)
    # the 7214 ASPCAP pixels, gaps out
    np.testing.assert_array_equal(k, np.r_[322:3242, 3648:6048, 6412:8306])
    return k, wave, spec.flux, spec.flux_err


def write_apogee_file(
    path, k, flux, err, *, n_rows=1, bitmask=None, model=None, crval=APOGEE_CRVAL1
):
    """An aspcapStar/apStar-like file: the spectrum placed on the full 8575-pixel
    log-lambda grid (zeros in the chip gaps), n_rows > 1 = apStar with visit rows."""
    full_f = np.zeros(APOGEE_NPIX, np.float32)
    full_e = np.zeros(APOGEE_NPIX, np.float32)
    full_f[k], full_e[k] = flux, err
    if n_rows > 1:
        full_f = np.vstack(
            [full_f] + [full_f * (1 + 0.1 * i) for i in range(1, n_rows)]
        )
        full_e = np.vstack([full_e] * n_rows)
    hdr = fits.Header()
    hdr["CRVAL1"], hdr["CDELT1"], hdr["CRPIX1"] = crval, APOGEE_CDELT1, 1
    hdr["CTYPE1"], hdr["DC-FLAG"] = "LOG-LINEAR", 1
    hdus = [
        fits.PrimaryHDU(),
        fits.ImageHDU(full_f, header=hdr, name="FLUX"),
        fits.ImageHDU(full_e, name="ERROR"),
    ]
    if bitmask is not None:
        hdus.append(fits.ImageHDU(bitmask, name="BITMASK"))
    if model is not None:
        hdus.append(fits.ImageHDU(model, name="MODEL"))
    fits.HDUList(hdus).writeto(path)


def test_apogee_fits_round_trip(tmp_path, apogee_star):
    k, wave, flux, err = apogee_star
    path = tmp_path / "aspcapStar-dr17-2M13012770+5754582.fits"
    write_apogee_file(path, k, flux, err, model=np.ones(APOGEE_NPIX, np.float32))
    s = read_apogee_fits(path)
    assert s.id == "aspcapStar-dr17-2M13012770+5754582"
    full = 10.0 ** (APOGEE_CRVAL1 + APOGEE_CDELT1 * np.arange(APOGEE_NPIX))
    np.testing.assert_array_equal(s.wavelength, full)
    np.testing.assert_allclose(s.wavelength[k], wave, rtol=1e-12, atol=0)
    np.testing.assert_array_equal(s.flux[k], flux)
    np.testing.assert_array_equal(s.flux_err[k], err)
    gaps = np.setdiff1d(np.arange(APOGEE_NPIX), k)
    assert np.all(s.flux[gaps] == 0) and np.all(s.flux_err[gaps] == 0)
    assert s.flux.dtype.isnative and s.flux.dtype == np.float32
    assert not s.mask.any()  # a floating HDU 3 (aspcapStar's model) is not a mask


def test_apstar_first_row_and_bitmask(tmp_path, apogee_star):
    k, _, flux, err = apogee_star
    bits = np.zeros((3, APOGEE_NPIX), np.int32)
    bits[0, k[:5]] = [1, 2, 1 << 7, 1 << 9, 1 << 12]  # bad, bad, bad, warning, warning
    bits[1, k[10]] = 1  # a visit's bit: not the combined row's
    path = tmp_path / "apStar-dr17-2M0001.fits"
    write_apogee_file(path, k, flux, err, n_rows=3, bitmask=bits)
    s = read_apogee_fits(path)
    np.testing.assert_array_equal(s.flux[k], flux)  # row 0, not a visit row
    np.testing.assert_array_equal(np.flatnonzero(s.mask), k[:3])
    assert APOGEE_BAD_PIXEL_BITS == 0xFF
    s_all = read_apogee_fits(path, bad_bits=~0)
    np.testing.assert_array_equal(np.flatnonzero(s_all.mask), k[:5])


def test_list_of_fits_files_is_one_catalog(tmp_path, apogee_star):
    k, _, flux, err = apogee_star
    paths = []
    for i in range(3):
        p = tmp_path / f"aspcapStar-{i}.fits"
        write_apogee_file(p, k, flux * (1 + 0.01 * i), err)
        paths.append(p)
    cat = pl.open_catalog(paths)
    assert isinstance(cat, ApogeeFitsCatalog) and len(cat) == 3
    assert cat.wavelength.shape == (APOGEE_NPIX,)
    parts = list(pl.iter_catalog(paths, chunk_size=2))
    assert [s for s, _ in parts] == [0, 2]
    got = np.concatenate([c.flux for _, c in parts])
    for i in range(3):
        np.testing.assert_array_equal(
            got[i, k], (flux * (1 + 0.01 * i)).astype(np.float32)
        )
    assert list(np.concatenate([c.ids for _, c in parts])) == [
        "aspcapStar-0",
        "aspcapStar-1",
        "aspcapStar-2",
    ]


def test_bad_fits_files(tmp_path, apogee_star):
    k, _, flux, err = apogee_star
    one_hdu = tmp_path / "one.fits"
    fits.HDUList([fits.PrimaryHDU(np.ones(10, np.float32))]).writeto(one_hdu)
    with pytest.raises(
        FileFormatError,
        match=r"one.fits: expected an APOGEE-like FITS file with flux in "
        r"HDU 1 and errors in HDU 2, found 1 HDU\(s\)",
    ):
        read_apogee_fits(one_hdu)
    no_wave = tmp_path / "nowave.fits"
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(np.ones(10, np.float32)),
            fits.ImageHDU(np.ones(10, np.float32)),
        ]
    ).writeto(no_wave)
    with pytest.raises(
        FileFormatError, match="no wavelength keywords: expected CRVAL1"
    ):
        read_apogee_fits(no_wave)
    garbage = tmp_path / "garbage.fits"
    garbage.write_bytes(b"SIMPLE = nonsense" * 10)
    with pytest.raises(FileFormatError, match="garbage.fits"):
        read_apogee_fits(garbage)
    with pytest.raises(FileNotFoundError, match="nope.fits: no such file"):
        pl.open_catalog([tmp_path / "nope.fits"])
    a, b = tmp_path / "a.fits", tmp_path / "b.fits"
    write_apogee_file(a, k, flux, err)
    write_apogee_file(b, k, flux, err, crval=APOGEE_CRVAL1 + 1e-5)
    with pytest.raises(
        FileFormatError, match="b.fits: wavelength grid .* differs from"
    ):
        pl.open_catalog([a, b])
    with pytest.raises(ValueError, match="not FITS: .*c.h5"):
        pl.open_catalog([a, tmp_path / "c.h5"])


# --- fit_catalog --------------------------------------------------------------------
def assert_tables_equal(got, ref, columns):
    """Same rows: integer/bool/str columns exactly; fitted values within 1e-2 of their
    1-sigma error (the fitter's convergence tolerance: spectra fitted at another
    position of a vmapped float32 batch can round differently); errors, chi2 and
    covariances to rtol 1e-3."""
    for name in columns:
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        assert a.shape == b.shape, name
        assert np.array_equal(np.isnan(a), np.isnan(b)) if a.dtype.kind == "f" else True
        if a.dtype.kind != "f":
            np.testing.assert_array_equal(a, b, err_msg=name)
        elif f"{name}_err" in ref.colnames:
            sigma = np.asarray(ref[f"{name}_err"])
            ok = np.isnan(b) | (np.abs(a - b) <= 1e-2 * sigma)
            assert ok.all(), (name, a[~ok], b[~ok], sigma[~ok])
        else:
            np.testing.assert_allclose(
                a, b, rtol=1e-3, atol=1e-12, equal_nan=True, err_msg=name
            )


def test_fit_catalog_equals_fit_on_the_same_arrays(tmp_path, emu, cat_path, data):
    flux, err, mask, ids = data
    out = tmp_path / "results.fits"
    table = pl.fit_catalog(cat_path, out, emu, chunk_size=8, progress=False)
    ref = pl.fit(flux, err, emu, mask=mask)
    assert table.colnames == ["id", *ref.colnames]
    assert list(table["id"]) == list(ids)
    assert_tables_equal(table, ref, ref.colnames)
    assert table["flags"][7] & 4  # the fully masked spectrum failed, as in fit
    assert np.count_nonzero(table["converged"]) >= N_SPEC // 2  # real fits happened
    assert np.all(table["n_iter"][table["converged"]] > 0)
    assert table.meta["n_spec"] == N_SPEC and table.meta["chunk_size"] == 8
    assert table.meta["catalog"] == str(cat_path)
    back = pl.read_results(out)
    assert back.colnames == table.colnames
    assert_tables_equal(back, table, table.colnames)


def test_fit_catalog_other_wavelengths_p0_and_fit_kwargs(tmp_path, emu):
    # observed grid: a sub-range of the emulator's, shifted by a fraction of a pixel
    # (6 rest pixels beyond each end: Lanczos-6's taps reach 5 left, 6 right)
    wave = emu.wavelength[6:-6] + 0.05
    _, flux, err = spectra(emu, 5, seed=9)
    flux, err = flux[:, 6:-6], err[:, 6:-6]
    cat = pl.write_catalog(tmp_path / "c.h5", flux, err, wave)
    lo, hi = emu.label_lo, emu.label_hi
    p0 = lo + (hi - lo) * np.linspace(0.3, 0.7, 5)[:, None]
    pix_mask = np.zeros(wave.size, bool)
    pix_mask[:3] = True
    fixed = {"logg": 3.0, "rv": 0.0}  # rv fixed: all overlapping pixels count
    kw = dict(
        p0=p0, mask=pix_mask, fixed=fixed, cont_deg=1,
        options=pl.LMOptions(max_iter=30),
    )  # fmt: skip
    table = pl.fit_catalog(
        cat, tmp_path / "r.ecsv", emu, chunk_size=2, progress=False, **kw
    )
    ref = pl.fit(flux, err, emu, wavelength=wave, **kw)
    assert "id" not in table.colnames
    assert_tables_equal(table, ref, ref.colnames)
    np.testing.assert_allclose(table["logg"], 3.0, rtol=1e-6)  # float32 fit space
    assert np.all(table["rv"] == 0.0)
    assert np.all(table["n_good_pixels"] == wave.size - 3)  # the extra mask applied
    assert np.all(np.isfinite(table["Teff"]))


def test_fit_catalog_refuses_bad_settings_before_fitting(tmp_path, emu, cat_path):
    out = tmp_path / "r.fits"
    with pytest.raises(TypeError, match="MDN"):
        pl.fit_catalog(cat_path, out, emu, mdn=object())
    no_dask = importlib.util.find_spec("distributed") is None
    with pytest.raises(
        ImportError if no_dask else TypeError,
        match="needs dask.distributed" if no_dask else "must be a distributed.Client",
    ):
        pl.fit_catalog(cat_path, out, emu, client=object())
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        pl.fit_catalog(cat_path, out, emu, chunk_size=0)
    with pytest.raises(ValueError, match="unknown results file suffix '.txt'"):
        pl.fit_catalog(cat_path, tmp_path / "r.txt", emu)
    with pytest.raises(ValueError, match=r"sets \['return_model'\] itself"):
        pl.fit_catalog(cat_path, out, emu, return_model=True)
    with pytest.raises(ValueError, match=r"mask must be a bool array \(60,\)"):
        pl.fit_catalog(cat_path, out, emu, mask=np.zeros(59, bool), progress=False)
    with pytest.raises(FileNotFoundError, match="missing.h5: no such file"):
        pl.fit_catalog(tmp_path / "missing.h5", out, emu)
    out.write_text("keep me")
    with pytest.raises(FileExistsError, match="r.fits exists"):
        pl.fit_catalog(cat_path, out, emu)
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.fits"]


# --- one wavelength grid per spectrum (format version 2) ----------------------------
N_ROW, N_LOG = 10, 120


@pytest.fixture(scope="module")
def log_emu():
    """The tiny emulator on a log-uniform grid of 120 pixels (as in test_matrix)."""
    from conftest import build_log_emulator

    return build_log_emulator(N_LOG)


@pytest.fixture(scope="module")
def rows(log_emu):
    """(flux, flux_err, wavelength, mask, ids) of 10 spectra, each on one of two
    slices of the emulator's grid (6 pixels shorter); row 4's first two pixels have
    no wavelength (NaN), row 6 is partly masked."""
    _, full, err = spectra(log_emu, N_ROW, seed=5, snr=100.0)
    m = N_LOG - 6
    start = np.array([0, 0, 3, 3, 0, 3, 3, 0, 0, 3])
    flux = np.stack([full[i, k : k + m] for i, k in enumerate(start)])
    err = np.stack([err[i, k : k + m] for i, k in enumerate(start)])
    wave = np.stack([log_emu.wavelength[k : k + m] for k in start])
    wave[4, :2] = np.nan
    mask = np.zeros(flux.shape, bool)
    mask[6, 20:50] = True
    ids = np.array([f"v{i:02d}" for i in range(N_ROW)])
    return flux, err, wave, mask, ids


@pytest.fixture(scope="module")
def row_cat(tmp_path_factory, rows):
    flux, err, wave, mask, ids = rows
    path = tmp_path_factory.mktemp("rowcat") / "rows.h5"
    return pl.write_catalog(path, flux, err, wave, mask=mask, ids=ids)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_per_row_grids_round_trip(tmp_path, rows, dtype):
    flux, err, wave, mask, ids = rows
    flux, err = flux.astype(dtype), err.astype(dtype)
    path = pl.write_catalog(tmp_path / "c.h5", flux, err, wave, mask=mask, ids=ids)
    with h5py.File(path, "r") as f:
        assert f.attrs["format_version"] == 3  # older readers refuse it by version
        ds = f["wavelength"]
        assert ds.shape == flux.shape and ds.dtype == np.float64
        assert ds.chunks[1] == flux.shape[1] and ds.fletcher32  # rows, checksummed
    with pl.open_catalog(path) as cat:
        assert cat.per_row_wavelength and cat.wavelength is None
        assert cat.n_pix == flux.shape[1] and len(cat) == N_ROW
        assert "wavelength='per row'" in repr(cat)
        chunk = cat.read(0, N_ROW)
        part = cat.read(3, 7)
        grids = cat.read_wavelength(2, 5)
    assert chunk.flux.dtype == dtype and chunk.flux_err.dtype == dtype
    assert chunk.wavelength.dtype == np.float64
    for got, ref in zip(chunk[:5], (flux, err, mask, ids, wave), strict=True):
        np.testing.assert_array_equal(got, ref)  # NaN == NaN here
    assert chunk.group is None and chunk.rows is None
    np.testing.assert_array_equal(part.wavelength, wave[3:7])
    np.testing.assert_array_equal(grids, wave[2:5])

    # the same file from blocks appended with their grids
    blocks = tmp_path / "blocks.h5"
    with catalog_writer(blocks, None, dtype=dtype, with_mask=True, with_ids=True) as w:
        for s, e in [(0, 3), (3, 4), (4, 10)]:
            w.append(flux[s:e], err[s:e], wavelength=wave[s:e], mask=mask[s:e],
                     ids=ids[s:e])  # fmt: skip
    with pl.open_catalog(blocks) as cat:
        again = cat.read(0, N_ROW)
    for u, v in zip(again, chunk, strict=True):
        np.testing.assert_array_equal(u, v)
    starts, parts = zip(*pl.iter_catalog(blocks, chunk_size=4), strict=True)
    assert starts == (0, 4, 8)
    np.testing.assert_array_equal(np.concatenate([p.wavelength for p in parts]), wave)


def test_one_grid_catalogs(tmp_path, emu, cat_path):
    _, flux, err = spectra(emu, 3)
    with catalog_writer(tmp_path / "w.h5", emu.wavelength) as w:
        w.append(flux, err)
    for path in (cat_path, tmp_path / "w.h5"):
        with h5py.File(path, "r") as f:
            assert f["wavelength"].ndim == 1
        with pl.open_catalog(path) as cat:
            assert not cat.per_row_wavelength and cat.n_pix == N_PIX
            assert cat.read(0, 2).wavelength is None
            grids = cat.read_wavelength(0, 2)
        assert grids.shape == (2, N_PIX)
        np.testing.assert_array_equal(grids, np.stack([emu.wavelength] * 2))


def test_per_row_grids_bad_input(tmp_path, rows, emu):
    flux, err, wave, _, _ = rows
    path = tmp_path / "a.h5"
    with pytest.raises(ValueError, match=r"wavelength \(9, 114\) must have the shape"):
        pl.write_catalog(path, flux, err, wave[1:])
    bad = wave.copy()
    bad[3, 10] = bad[3, 9]
    with pytest.raises(ValueError, match="wavelength row 3 must be strictly incr"):
        pl.write_catalog(path, flux, err, bad)
    bad = wave.copy()
    bad[5, 1:] = np.nan
    with pytest.raises(ValueError, match="wavelength row 5 has 1 finite value"):
        pl.write_catalog(path, flux, err, bad)
    bad = wave.copy()
    bad[2, 0] = -1.0
    with pytest.raises(ValueError, match="wavelength row 2 must be positive"):
        pl.write_catalog(path, flux, err, bad)
    with pytest.raises(ValueError, match="one wavelength grid per spectrum: pass"):
        with catalog_writer(path, None) as w:
            w.append(flux, err)
    block = wave[5:].copy()
    block[2] = block[2, ::-1]  # row 7 of the catalog
    with pytest.raises(ValueError, match="wavelength row 7 must be strictly incr"):
        with catalog_writer(path, None) as w:  # rows counted across appends
            w.append(flux[:5], err[:5], wavelength=wave[:5])
            w.append(flux[5:], err[5:], wavelength=block)
    _, f1, e1 = spectra(emu, 2)
    with pytest.raises(ValueError, match="one wavelength grid .given to catalog_wr"):
        with catalog_writer(path, emu.wavelength) as w:
            w.append(f1, e1, wavelength=np.stack([emu.wavelength] * 2))
    with pytest.raises(ValueError, match=r"wavelength must be \(P,\), one grid"):
        with catalog_writer(path, np.stack([emu.wavelength] * 2)):
            pass
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing left behind


def test_catalog_versions_and_bad_per_row_files(tmp_path, rows, row_cat, emu, data):
    flux, err, wave, _, _ = rows
    # a hand-written version-1 file (as earlier payne_lite wrote them) still reads
    f1, e1, _, _ = data
    _raw_catalog(tmp_path / "v1.h5", emu.wavelength, f1, e1, version=1)
    with pl.open_catalog(tmp_path / "v1.h5") as cat:
        np.testing.assert_array_equal(cat.read(0, N_SPEC).flux, f1)
        np.testing.assert_array_equal(cat.wavelength, emu.wavelength)
    # version 1 holds one grid: a (n, P) wavelength there is not read as one
    _raw_catalog(tmp_path / "v1rows.h5", wave, flux, err, version=1)
    with pytest.raises(FileFormatError, match="format_version 1 catalog holds one"):
        pl.open_catalog(tmp_path / "v1rows.h5")
    _raw_catalog(tmp_path / "v4.h5", wave, flux, err, version=4)
    with pytest.raises(
        FileFormatError,
        match=r"v4.h5: payne_lite.Catalog format_version=4 is not supported "
        r"\(this payne_lite reads \[1, 2, 3\]\)",
    ):
        pl.open_catalog(tmp_path / "v4.h5")
    _raw_catalog(tmp_path / "rowshape.h5", wave[:4], flux, err, version=2)
    with pytest.raises(
        FileFormatError, match=r"wavelength \(4, 114\) must have the shape of flux"
    ):
        pl.open_catalog(tmp_path / "rowshape.h5")
    bad = wave.copy()
    bad[6, 30] = bad[6, 29]
    _raw_catalog(tmp_path / "badrow.h5", bad, flux, err, version=2)
    with pl.open_catalog(tmp_path / "badrow.h5") as cat:
        cat.read(0, 6)  # rows are checked as they are read
        with pytest.raises(
            FileFormatError, match="badrow.h5: invalid wavelength row 6 must be"
        ):
            cat.read(4, 8)
    # a damaged storage chunk of the grids is reported, not read as numbers
    raw = bytearray(row_cat.read_bytes())
    with h5py.File(row_cat, "r") as f:
        info = f["wavelength"].id.get_chunk_info(0)
    for k in range(16):
        raw[info.byte_offset + 100 + k] ^= 0xFF
    (tmp_path / "bitrot.h5").write_bytes(bytes(raw))
    with pl.open_catalog(tmp_path / "bitrot.h5") as cat:
        with pytest.raises(FileFormatError, match=r"rows \[0, 2\) are corrupt"):
            cat.read(0, 2)


#: fit options of the per-row catalog's fits
ROW_KW = dict(cont_deg=1, progress=False, options=pl.LMOptions(max_iter=30))


@pytest.fixture(scope="module")
def row_table(tmp_path_factory, log_emu, row_cat):
    """fit_catalog of the per-row catalog in chunks of 3, and its output file."""
    out = tmp_path_factory.mktemp("rowfit") / "r.fits"
    return pl.fit_catalog(row_cat, out, log_emu, chunk_size=3, **ROW_KW), out


def assert_same_numbers(got, ref):
    """Same columns and every number bit for bit (NaN == NaN)."""
    assert got.colnames == ref.colnames
    for name in ref.colnames:
        a, b = np.asarray(got[name]), np.asarray(ref[name])
        assert a.dtype == b.dtype, name
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), name


def test_fit_catalog_per_row_grids_equals_fit(log_emu, rows, row_table):
    flux, err, wave, mask, ids = rows
    table, out = row_table
    kw = {k: v for k, v in ROW_KW.items() if k != "progress"}
    ref = pl.fit(flux, err, log_emu, wavelength=wave, mask=mask, **kw)
    assert table.colnames == ["id", *ref.colnames]
    assert list(table["id"]) == list(ids)
    same = [c for c in ref.colnames if c != "grid_group"]
    assert_tables_equal(table, ref, same)
    for name in log_emu.label_names:  # labels to 1e-3 of their error
        a, b = np.asarray(table[name]), np.asarray(ref[name])
        assert np.all(np.abs(a - b) <= 1e-3 * np.asarray(ref[f"{name}_err"])), name
    assert np.count_nonzero(table["converged"]) >= N_ROW // 2  # real fits
    assert table["n_good_pixels"][4] == ref["n_good_pixels"][4] < wave.shape[1] - 1
    # grid_group: the catalog's distinct grids (row 4's NaN ends make a third) in the
    # order of their first rows, whatever the chunks; the same partition as fit's
    np.testing.assert_array_equal(table["grid_group"], [0, 0, 1, 1, 2, 1, 1, 0, 0, 1])
    pairs = set(
        zip(np.asarray(table["grid_group"]), np.asarray(ref["grid_group"]), strict=True)
    )
    assert len(pairs) == 3 == table.meta["n_wavelength_grids"]
    back = pl.read_results(out)
    np.testing.assert_array_equal(back["grid_group"], table["grid_group"])


def test_fit_catalog_per_row_grids_resume(
    tmp_path, monkeypatch, log_emu, rows, row_table
):
    from payne_lite.catalog import parts_folder

    flux, err, wave, mask, ids = rows
    cat = pl.write_catalog(tmp_path / "c.h5", flux, err, wave, mask=mask, ids=ids)
    kw = dict(chunk_size=5, **ROW_KW)

    calls = []
    out = tmp_path / "r.fits"
    interrupt_chunk(monkeypatch, 2, lambda chunk: calls.append(len(chunk.flux)))
    with pytest.raises(KeyboardInterrupt):
        pl.fit_catalog(cat, out, log_emu, **kw)
    monkeypatch.undo()
    assert parts_folder(out).is_dir() and not out.exists()
    table = pl.fit_catalog(cat, out, log_emu, keep_parts=True, **kw)
    assert table.meta["n_chunks_resumed"] == 1 and len(calls) == 2
    # the same numbers as one uninterrupted run in other chunks
    assert_same_numbers(table, row_table[0])
    assert table.meta["n_wavelength_grids"] == 3

    # the kept parts do not resume onto other grids (same rows, same file size)
    shifted = wave.copy()
    shifted[9] += 0.01
    pl.write_catalog(cat, flux, err, shifted, mask=mask, ids=ids, overwrite=True)
    with pytest.raises(ValueError, match="cannot resume.*wavelength_sha256"):
        pl.fit_catalog(cat, out, log_emu, overwrite=True, **kw)


def test_fit_catalog_per_row_grids_checked_before_fitting(tmp_path, log_emu, rows):
    flux, err, wave, _, _ = rows
    out = tmp_path / "r.fits"
    far = wave.copy()
    far[7] += 500.0  # row 7 is off the emulator's range
    cat = pl.write_catalog(tmp_path / "far.h5", flux, err, far)
    with pytest.raises(ValueError, match=r"far.h5: wavelength row 7: grid \[156"):
        pl.fit_catalog(cat, out, log_emu, chunk_size=3, progress=False)
    with pytest.raises(ValueError, match="the samplers take one wavelength grid"):
        pl.fit_catalog(cat, out, log_emu, method="emcee", progress=False)
    # spectra of the emulator's length: a grid that nearly equals its grid warns once
    rest = log_emu.wavelength
    near = np.stack([rest, rest + 0.01, rest + 0.02, rest + 600.0])
    f4 = np.ones(near.shape)
    cat = pl.write_catalog(tmp_path / "near.h5", f4, 0.01 * f4, near)
    with pytest.warns(pl.WavelengthGridWarning, match="near.h5: wavelength row 1 "):
        with pytest.raises(ValueError, match="wavelength row 3: grid"):
            pl.fit_catalog(cat, out, log_emu, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["far.h5", "near.h5"]


needs_dask = pytest.mark.skipif(
    importlib.util.find_spec("distributed") is None,
    reason="dask.distributed is not installed (pip install 'payne-lite[dask]')",
)


@needs_dask
def test_fit_catalog_per_row_grids_on_dask(tmp_path, log_emu, row_cat, row_table):
    import distributed

    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:  # an in-process worker: chunks still go through the scheduler
        table = pl.fit_catalog(
            row_cat, tmp_path / "dask.fits", log_emu, client=client, chunk_size=4,
            **ROW_KW,
        )  # fmt: skip
    assert table.meta["n_workers"] == 1
    assert_same_numbers(table, row_table[0])


# --- star ids (group) and joint fits of visits ----------------------------------------
def test_group_round_trip_and_read_rows(tmp_path, emu, data, row_cat, rows):
    flux, err, mask, ids = data
    star = np.arange(N_SPEC) % 7  # ints, stored as str; stars not contiguous
    path = pl.write_catalog(
        tmp_path / "g.h5", flux, err, emu.wavelength, mask=mask, ids=ids, group=star
    )
    with h5py.File(path, "r") as f:
        assert "group" in json.loads(f.attrs["strings_sha256"])
        assert list(f["group"].asstr()[()]) == [str(s) for s in star]
    with pl.open_catalog(path) as cat:
        assert cat.has_group and "group=True" in repr(cat)
        assert list(cat.read_group()) == [str(s) for s in star]
        assert list(cat.read(3, 6).group) == ["3", "4", "5"]
        assert cat.read(3, 6).rows is None
        want = np.array([17, 2, 9, 3, 4, 0])  # any order; a run of rows and gaps
        got = cat.read_rows(want)
        np.testing.assert_array_equal(got.rows, want)
        for name, full in (("flux", flux), ("flux_err", err), ("mask", mask)):
            np.testing.assert_array_equal(getattr(got, name), full[want])
        assert list(got.ids) == list(ids[want])
        assert list(got.group) == [str(s) for s in star[want]]
        np.testing.assert_array_equal(cat.read_rows(np.arange(4, 8)).flux, flux[4:8])
        for bad, match in (([3, 3], "repeat"), ([0, N_SPEC], "outside"), ([], "1-D")):
            with pytest.raises(IndexError, match=match):
                cat.read_rows(np.array(bad, int))
    with pl.open_catalog(row_cat) as cat:  # per-row grids come with their rows
        assert not cat.has_group and cat.read_group() is None
        assert cat.read(0, 2).group is None
        got = cat.read_rows([9, 2, 4])
        np.testing.assert_array_equal(got.wavelength, rows[2][[9, 2, 4]])
        np.testing.assert_array_equal(got.flux, rows[0][[9, 2, 4]])

    # in blocks: a star's visits in several appends
    blocks = tmp_path / "blocks.h5"
    with catalog_writer(blocks, emu.wavelength, with_group=True) as w:
        for s, e in [(0, 7), (7, 20)]:
            w.append(flux[s:e], err[s:e], group=star[s:e])
        with pytest.raises(ValueError, match="opened with_group=True; got group=None"):
            w.append(flux[:1], err[:1])
    with pl.open_catalog(blocks) as cat:
        assert list(cat.read_group()) == [str(s) for s in star]
    with pytest.raises(ValueError, match=r"group of row 2 is empty"):
        pl.write_catalog(tmp_path / "e.h5", flux[:3], err[:3], emu.wavelength,
                         group=["a", "a", ""])  # fmt: skip
    with pytest.raises(ValueError, match=r"group \(2,\) must be \(3,\)"):
        pl.write_catalog(tmp_path / "e.h5", flux[:3], err[:3], emu.wavelength,
                         group=["a", "a"])  # fmt: skip
    # a file whose stored group has an empty id, or the wrong length, is refused:
    # by its checksum, and when written so, by the checks of the values
    with h5py.File(blocks, "a") as f:
        f["group"][5] = ""
    with pytest.raises(FileFormatError, match="'group' do not match the checksum"):
        pl.open_catalog(blocks)
    redigest_catalog(blocks)
    with pl.open_catalog(blocks) as cat:
        with pytest.raises(FileFormatError, match="group of row 5 is empty"):
            cat.read_group()
    with h5py.File(blocks, "a") as f:
        del f["group"]
        f["group"] = np.array(["a"] * 3, dtype=object).astype(h5py.string_dtype())
    redigest_catalog(blocks)
    with pytest.raises(FileFormatError, match=r"group \(3,\) must be \(20,\)"):
        pl.open_catalog(blocks)
    assert not (tmp_path / "e.h5").exists()


def test_fits_catalog_read_rows(tmp_path, apogee_star):
    k, _, flux, err = apogee_star
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"aspcapStar-{i}.fits")
        write_apogee_file(paths[-1], k, flux * (1 + 0.01 * i), err)
    with pl.open_catalog(paths) as cat:
        assert not cat.has_group and cat.read_group() is None
        got = cat.read_rows([3, 0, 1])
    assert list(got.ids) == ["aspcapStar-3", "aspcapStar-0", "aspcapStar-1"]
    np.testing.assert_array_equal(got.rows, [3, 0, 1])
    for row, i in enumerate([3, 0, 1]):
        want = (flux * (1 + 0.01 * i)).astype(np.float32)  # as written
        np.testing.assert_array_equal(got.flux[row, k], want)


#: Star of each row of the visits catalog: B, A, C, D in order of first appearance
#: with 3, 3, 1 and 2 visits, rows interleaved; chunks of 4 spectra hold [B], [A, C]
#: and [D] (a chunk ends between stars, never inside one).
VISIT_STARS = np.array(["B", "A", "C", "B", "D", "A", "D", "B", "A"])
#: Options of the joint fits (rv_range narrow: one scan, fast).
VISIT_KW = dict(cont_deg=1, rv_range=(-60.0, 60.0), options=pl.LMOptions(max_iter=30))


@pytest.fixture(scope="module")
def visits(tmp_path_factory, log_emu):
    """(flux, flux_err, ids, catalog) of 9 visits of 4 stars, each visit at its own
    rv, S/N 80, in a catalog with ids and group."""
    truth = {"A": [5000.0, 3.0, -0.5], "B": [6200.0, 4.2, 0.0],
             "C": [4500.0, 2.0, -1.0], "D": [5600.0, 4.0, -0.2]}  # fmt: skip
    rng = np.random.default_rng(11)
    labels = np.array([truth[s] for s in VISIT_STARS])
    rv = rng.uniform(-30.0, 30.0, VISIT_STARS.size)
    wave = log_emu.wavelength
    clean = np.stack(
        [
            np.interp(wave, wave * (1 + v / 299792.458), f)
            for v, f in zip(rv, log_emu.predict(labels), strict=True)
        ]
    )
    err = np.full_like(clean, 1.0 / 80.0)
    flux = clean + err * rng.normal(size=clean.shape)
    ids = np.array([f"visit{i}" for i in range(VISIT_STARS.size)])
    path = tmp_path_factory.mktemp("visits") / "visits.h5"
    pl.write_catalog(path, flux, err, wave, ids=ids, group=VISIT_STARS)
    return flux, err, ids, path


@pytest.fixture(scope="module")
def group_table(tmp_path_factory, log_emu, visits):
    """fit_catalog(group=True) of the visits catalog in chunks of 4, and its file."""
    out = tmp_path_factory.mktemp("groupfit") / "stars.fits"
    table = pl.fit_catalog(
        visits[3], out, log_emu, group=True, chunk_size=4, progress=False, **VISIT_KW
    )
    return table, out


def test_fit_catalog_group_equals_fit(log_emu, visits, group_table):
    flux, err, ids, _ = visits
    table, out = group_table
    ref = pl.fit(flux, err, log_emu, group=VISIT_STARS, **VISIT_KW)
    assert table.colnames == ["id", *ref.colnames]
    assert list(table["group"]) == ["B", "A", "C", "D"] == list(ref["group"])
    assert_tables_equal(table, ref, ref.colnames)
    for name in log_emu.label_names:  # labels to 1e-3 of their error
        a, b = np.asarray(table[name]), np.asarray(ref[name])
        assert np.all(np.abs(a - b) <= 1e-3 * np.asarray(ref[f"{name}_err"])), name
    np.testing.assert_array_equal(
        table["visit_rows"], [[0, 3, 7], [1, 5, 8], [2, -1, -1], [4, 6, -1]]
    )
    np.testing.assert_array_equal(table["visit_rows"], ref["visit_rows"])
    vr = np.asarray(table["visit_rows"])
    assert np.array_equal(table["id"], np.where(vr >= 0, ids[np.maximum(vr, 0)], ""))
    np.testing.assert_allclose(table["rv"], ref["rv"], rtol=0, atol=1e-3)
    assert np.all(np.isnan(table["rv"][2, 1:])) and np.all(table["converged"])
    assert table.meta["n_spec"] == 9 and table.meta["n_stars"] == 4
    assert table.meta["n_visits_max"] == 3  # 3 labels, 3 x (rv, 2 cont):
    assert np.shape(table["covariance"]) == (4, 12, 12)
    pl.check_results_schema(table)
    back = pl.read_results(out)
    assert back.colnames == table.colnames
    assert_tables_equal(back, table, table.colnames)


def test_fit_catalog_group_resume(tmp_path, monkeypatch, log_emu, visits, group_table):
    from payne_lite.catalog import parts_folder

    cat = visits[3]
    kw = dict(chunk_size=4, progress=False, **VISIT_KW)
    calls = []
    out = tmp_path / "r.fits"
    interrupt_chunk(monkeypatch, 2, lambda chunk: calls.append(list(chunk.rows)))
    with pytest.raises(KeyboardInterrupt):
        pl.fit_catalog(cat, out, log_emu, group=True, **kw)
    monkeypatch.undo()
    assert calls == [[0, 3, 7], [1, 2, 5, 8]]  # chunks of whole stars
    assert parts_folder(out).is_dir() and not out.exists()
    table = pl.fit_catalog(cat, out, log_emu, group=True, keep_parts=True, **kw)
    assert table.meta["n_chunks_resumed"] == 1 and len(calls) == 2
    assert_same_numbers(table, group_table[0])  # as one uninterrupted run

    # the kept parts do not resume onto another grouping, nor onto single fits
    other = np.where(VISIT_STARS == "D", "C", VISIT_STARS)
    with pytest.raises(ValueError, match=r"cannot resume.*\(differs: group_sha256"):
        pl.fit_catalog(cat, out, log_emu, group=other, overwrite=True, **kw)
    with pytest.raises(ValueError, match=r"cannot resume.*\(differs: group_sha256"):
        pl.fit_catalog(cat, out, log_emu, overwrite=True, **kw)


def test_fit_catalog_group_checked_before_fitting(tmp_path, log_emu, emu, cat_path):
    out = tmp_path / "r.fits"
    missing = tmp_path / "missing.h5"  # refused before the catalog is opened:
    with pytest.raises(ValueError, match="method='emcee': group is a point-fit arg"):
        pl.fit_catalog(missing, out, log_emu, method="emcee", group=True)
    with pytest.raises(ValueError, match="rv cannot be fixed"):
        pl.fit_catalog(missing, out, log_emu, group=True, fixed={"rv": 0.0})
    with pytest.raises(ValueError, match=r"group must be True .* got shape \(\)"):
        pl.fit_catalog(missing, out, log_emu, group="A")
    # refused once the catalog is open, before any fit
    with pytest.raises(ValueError, match="group=True: .*catalog.h5 holds no group"):
        pl.fit_catalog(cat_path, out, emu, group=True, progress=False)
    with pytest.raises(ValueError, match=r"group \(5,\) must be \(20,\): one star"):
        pl.fit_catalog(cat_path, out, emu, group=np.arange(5), progress=False)
    with pytest.raises(ValueError, match=r"group=: p0 must be one label vector"):
        p0 = np.tile([5000.0, 3.0, -0.5], (N_SPEC, 1))
        pl.fit_catalog(cat_path, out, emu, group=np.arange(N_SPEC), p0=p0)
    assert list(tmp_path.iterdir()) == []


def test_fit_catalog_group_per_row_grids(tmp_path, log_emu):
    # two grids of one shape off the emulator's pixels (one compiled solver), each
    # star on one; chunks of 4 spectra hold [p, r] and [q, s]
    star = np.array(["p", "r", "q", "p", "s", "r", "q", "s"])
    on_b = np.isin(star, ["r", "s"])[:, None]
    rest = log_emu.wavelength[3:-3]
    wave = np.where(on_b, rest - 0.021, rest + 0.013)
    _, flux, err = spectra(log_emu, star.size, seed=5, snr=100.0)
    flux, err = flux[:, 3:-3], err[:, 3:-3]
    ids = np.array([f"v{i}" for i in range(star.size)])
    cat = pl.write_catalog(tmp_path / "c.h5", flux, err, wave, ids=ids, group=star)
    table = pl.fit_catalog(
        cat, tmp_path / "r.h5", log_emu, group=True, chunk_size=4, progress=False,
        **VISIT_KW,
    )  # fmt: skip
    ref = pl.fit(flux, err, log_emu, wavelength=wave, group=star, **VISIT_KW)
    assert list(table["group"]) == ["p", "r", "q", "s"] == list(ref["group"])
    assert_tables_equal(table, ref, [c for c in ref.colnames if c != "grid_group"])
    np.testing.assert_array_equal(table["visit_rows"], [[0, 3], [1, 5], [2, 6], [4, 7]])
    # the catalog's grids in the order of their first rows, whatever the chunks
    np.testing.assert_array_equal(table["grid_group"], [0, 1, 0, 1])
    assert table.meta["n_wavelength_grids"] == 2

    # a star with visits on two grids: refused before any chunk is fitted
    star[1] = "p"
    bad = pl.write_catalog(tmp_path / "bad.h5", flux, err, wave, group=star)
    with pytest.raises(
        ValueError, match=r"bad.h5: group: the visits of star 'p' \(rows 0, 1, 3\) "
        "are on 2 different wavelength grids",
    ):  # fmt: skip
        pl.fit_catalog(bad, tmp_path / "bad.fits", log_emu, group=True, **VISIT_KW)
    assert not (tmp_path / "bad.fits.parts").exists()


@needs_dask
def test_fit_catalog_group_on_dask(tmp_path, log_emu, visits, group_table):
    import distributed

    star = np.unique(VISIT_STARS, return_inverse=True)[1] + 100  # ids as ints
    with distributed.Client(
        processes=False, n_workers=1, threads_per_worker=1, dashboard_address=None
    ) as client:
        table = pl.fit_catalog(
            visits[3], tmp_path / "dask.h5", log_emu, client=client, chunk_size=4,
            group=star, progress=False, **VISIT_KW,
        )  # fmt: skip
    assert table.meta["n_workers"] == 1
    assert list(table["group"]) == [101, 100, 102, 103]
    ref = group_table[0]
    ref = ref[[c for c in ref.colnames if c != "group"]]
    assert_same_numbers(table[ref.colnames], ref)


def test_resume_identity_holds_the_default_instrument(cat_path, emu, monkeypatch):
    """A run without ``instrument=`` keeps the identity of the runs before while the
    default Doppler interpolant is theirs (Keys' cubic); once the default is another,
    it is identified by the default instrument, every field (the same as
    ``Instrument()`` passed explicitly), so parts fitted under the old default are
    not resumed into a table the new one fits."""
    from payne_lite.catalog import _parts
    from payne_lite.observe import DOPPLER_INTERP

    def ident(**kw):
        with pl.open_catalog(cat_path) as cat:
            return _parts.run_identity(
                cat, emu, mdn=None, method="lm", chunk_size=4, mask=None, p0=None,
                fit_kwargs=kw,
            )["fit_options_sha256"]  # fmt: skip

    old = _parts._OLD_DOPPLER
    assert old == "cubic6"  # the default of every run before 2026-12 (not a setting)
    new = "lanczos6"
    # today's default
    if DOPPLER_INTERP == old:
        assert ident() == _parts._digest({})
    else:
        assert ident() == ident(instrument=pl.Instrument())
    # under the old default: no instrument in it, as before
    monkeypatch.setattr(_parts, "Instrument", lambda: pl.Instrument(doppler=old))
    before = ident()
    assert before == _parts._digest({})
    assert before != ident(instrument=pl.Instrument(doppler=new))
    # a default with another interpolant
    monkeypatch.setattr(_parts, "Instrument", lambda: pl.Instrument(doppler=new))
    after = ident()
    assert after != before
    assert after == ident(instrument=pl.Instrument(doppler=new))
