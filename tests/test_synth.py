"""Tests of the built-in synthesizer (payne_lite.grid.synth).

Small line lists and short wavelength grids keep the file fast; the tests that vary a
label reuse one line list shape (unwanted species are switched off through log_gf)
so that the jitted core compiles only a few times.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from payne_lite.constants import C_KMS, THETA_CONST
from payne_lite.grid import SpectralGrid, _lines, synth

SUN = np.array([5800.0, 4.4, 0.0, 0.0, 5.0])
LINE_WAVE = 16010.0  # [A] centre of the isolated test line
OFF = -50.0  # added to log_gf to switch a line off (tau0 ~ 1e-50 -> 0 in float32)


# --- helpers and fixtures -----------------------------------------------------------
def _species_mask(lines: synth.LineList, names) -> np.ndarray:
    return np.isin(lines.species_names, list(names))


def _only(lines: synth.LineList, names) -> synth.LineList:
    """Same shape, with every line not of ``names`` switched off."""
    keep = _species_mask(lines, names)
    return lines._replace(log_gf=np.where(keep, lines.log_gf, lines.log_gf + OFF))


def _ew_angstrom(wave: np.ndarray, flux: np.ndarray) -> np.ndarray:
    """Equivalent width [A] of each spectrum, trapezoid rule; flux (..., n_pix)."""
    depth = 1.0 - flux.astype(np.float64)
    return np.sum(0.5 * (depth[..., 1:] + depth[..., :-1]) * np.diff(wave), axis=-1)


def _fwhm_kms(wave: np.ndarray, flux: np.ndarray, centre: float) -> float:
    """Full width at half depth [km/s] of the single absorption line in ``flux``."""
    v = (np.log(wave) - math.log(centre)) * C_KMS
    d = 1.0 - flux.astype(np.float64)
    k = int(np.argmax(d))
    half = 0.5 * d[k]
    left = np.interp(half, d[: k + 1], v[: k + 1])
    right = np.interp(half, d[k:][::-1], v[k:][::-1])
    return float(right - left)


@pytest.fixture(scope="module")
def fine_wave() -> np.ndarray:
    """20 A around LINE_WAVE, 0.69 km/s pixels: line shapes are well resolved."""
    return synth.default_wavelength(LINE_WAVE - 10.0, LINE_WAVE + 10.0, 1e-6)


@pytest.fixture(scope="module")
def one_line() -> synth.LineList:
    """One Fe I line at LINE_WAVE, negligible damping, tau0 = 1e-3 in the Sun."""
    lines = synth.make_linelist(60, seed=3)
    i = int(np.flatnonzero(lines.species_names == "Fe I")[0])
    line = lines.select([i])._replace(
        wavelength=np.array([LINE_WAVE]), log_gamma=np.array([-8.0])
    )
    tau0, _, _ = _line_params(SUN, line)
    return line._replace(log_gf=line.log_gf - np.log10(tau0) - 3.0)


@pytest.fixture(scope="module")
def window():
    """A 100 A window of the default grid and the default line list's lines in it."""
    wave = synth.default_wavelength(15550.0, 15650.0)
    lines = synth.make_linelist()
    inside = (lines.wavelength > 15540.0) & (lines.wavelength < 15660.0)
    return wave, lines.select(inside)


def _line_params(labels, lines: synth.LineList):
    """(tau0, b [km/s], gamma [km/s]) of each line, as float64 NumPy arrays."""
    labels = jnp.asarray(labels, jnp.float32)
    out = _lines.line_params(labels, _lines.line_arrays(lines))
    return tuple(np.asarray(x, dtype=np.float64) for x in out)


def _reference_log_tau0(labels, lines: synth.LineList) -> np.ndarray:
    """Independent float64 NumPy version of the strength formula (module docstring)."""
    teff, logg, feh, afe = (float(x) for x in labels[:4])
    theta = THETA_CONST / teff
    log_pe = 1.3 + (logg - 4.4) / 3.0 + 0.4 * feh + 5.0 * math.log10(teff / 5800.0)
    log_pg = 5.0 + 2.0 * (logg - 4.4) / 3.0 - 0.3 * feh
    out = []
    for sp_i, chi, gf in zip(
        lines.species, lines.excitation_potential, lines.log_gf, strict=True
    ):
        sp = synth.SPECIES[sp_i]
        x_h = feh + (afe if sp.alpha else 0.0)
        if sp.d0 > 0:
            b_h = {"H": 0.0, "C": feh, "N": feh, "O": feh + afe}[sp.partner]
            x = sp.d0 * (theta - THETA_CONST / sp.t_half) + b_h + log_pg - 5.0
            log_pop = -math.log10(1.0 + 10.0**-x)
        else:
            log_r = -0.1762 + 2.5 * math.log10(teff) - theta * sp.chi_ion - log_pe
            frac_ii = 10.0**log_r / (1.0 + 10.0**log_r)
            log_pop = math.log10(frac_ii if sp.ion else 1.0 - frac_ii)
        out.append(
            gf
            + sp.a_x
            - 12.0
            + x_h
            - theta * chi
            + log_pop
            - (log_pe + 0.4 * theta)
            + synth.LOG_TAU_CONST
        )
    return np.array(out)


# --- line list and wavelength grid --------------------------------------------------
def test_linelist_reproducible_from_seed_and_differs_between_seeds():
    a = synth.make_linelist(400, seed=1)
    b = synth.make_linelist(400, seed=1)
    c = synth.make_linelist(400, seed=2)
    for name, x, y in zip(synth.LineList._fields, a, b, strict=True):
        np.testing.assert_array_equal(x, y, err_msg=name)
    assert not np.array_equal(a.wavelength, c.wavelength)
    assert not np.array_equal(a.log_gf, c.log_gf)


def test_linelist_contents():
    lines = synth.make_linelist(3000, seed=0, wavelength_range=(15100.0, 17000.0))
    assert lines.n_lines == 3000
    assert all(np.shape(col) == (3000,) for col in lines)
    assert np.all(np.diff(lines.wavelength) >= 0)
    assert lines.wavelength.min() > 15100.0 and lines.wavelength.max() < 17000.0
    assert np.all((lines.species >= 0) & (lines.species < len(synth.SPECIES)))
    counts = {s.name: int(np.sum(lines.species_names == s.name)) for s in synth.SPECIES}
    assert max(counts, key=counts.get) == "Fe I"
    for name in ("Fe I", "Fe II", "Mg I", "Si I", "Ca I", "Ti I", "CO", "CN", "OH"):
        assert counts[name] > 0, name
    assert np.all(lines.is_molecule == _species_mask(lines, ["CO", "CN", "OH"]))
    assert np.all(lines.is_alpha[_species_mask(lines, ["Mg I", "Si I", "OH"])])
    assert not np.any(lines.is_alpha[_species_mask(lines, ["Fe I", "Fe II", "CN"])])
    assert np.all(lines.ion[_species_mask(lines, ["Fe II"])] == 1)
    assert np.all(np.isfinite(lines.log_gf)) and np.all(np.isfinite(lines.log_gamma))


def test_default_wavelength_is_log_uniform_apogee_like():
    wave = synth.default_wavelength()
    assert 7000 <= wave.size <= 9000
    assert wave[0] == pytest.approx(15100.0) and wave[-1] <= 17000.0
    np.testing.assert_allclose(np.diff(np.log10(wave)), 6e-6, rtol=1e-6)


# --- synthesize: basic properties ---------------------------------------------------
def test_flux_finite_in_unit_interval_and_continuum_one_far_from_lines(window):
    wave, lines = window
    # keep only lines between 15590 and 15610 A: the grid ends are > 5 A (> 90 km/s,
    # beyond the 45 km/s line window plus the broadening kernel) from every line
    lines = lines.select((lines.wavelength > 15590.0) & (lines.wavelength < 15610.0))
    labels = np.array([SUN, [4200.0, 1.8, 0.3, 0.2, 30.0], [7000, 5.0, -2.0, -0.2, 0]])
    flux = synth.synthesize(labels, wavelength=wave, linelist=lines)
    assert flux.shape == (3, wave.size) and flux.dtype == np.float32
    assert np.all(np.isfinite(flux)) and np.all(flux > 0) and np.all(flux <= 1)
    far = (wave < 15584.0) | (wave > 15616.0)
    np.testing.assert_allclose(flux[:, far], 1.0, atol=1e-5)
    assert np.all(flux.min(axis=1) < 0.999)  # and there are lines (few at 7000 K,
    assert flux[1].min() < 0.7  # [Fe/H] = -2; many in a cool metal-rich giant)
    one = synth.synthesize(labels[1], wavelength=wave, linelist=lines)
    assert one.shape == (wave.size,)
    np.testing.assert_allclose(one, flux[1], atol=1e-6)  # vmap == one at a time


def test_batches_are_padded_to_one_shape_and_match(window, monkeypatch):
    wave, lines = window
    labels = synth.sample_labels(5, seed=4)
    reference = synth.synthesize(labels, wavelength=wave, linelist=lines)
    shapes = []
    real = synth._synth_batch

    def recording(chunk, *args):
        shapes.append(chunk.shape)
        return real(chunk, *args)

    monkeypatch.setattr(synth, "_synth_batch", recording)
    before = labels.copy()
    flux = synth.synthesize(labels, wavelength=wave, linelist=lines, batch_size=2)
    assert shapes == [(2, 6)] * 3  # 5 spectra -> 3 batches of 2, the last one padded
    np.testing.assert_allclose(flux, reference, atol=1e-6)
    np.testing.assert_array_equal(labels, before)  # input not mutated


def test_default_line_list_and_grid():
    flux = synth.synthesize(SUN)
    assert flux.shape == (synth.default_wavelength().size,)
    assert 0.0 < flux.min() < 0.8 and 0.9999 < flux.max() <= 1.0
    # continuum-normalised: a good fraction of pixels lie within 1e-3 of 1
    assert np.mean(flux > 0.999) > 0.1


# --- line physics -------------------------------------------------------------------
def test_strength_formula_matches_independent_reference(window):
    _, lines = window
    for labels in (SUN, [4200.0, 1.8, -0.5, 0.3, 5.0], [6900.0, 4.9, 0.4, -0.1, 0]):
        tau0, _, _ = _line_params(labels, lines)
        ref = _reference_log_tau0(labels, lines)
        np.testing.assert_allclose(np.log10(tau0), ref, atol=2e-3)


def test_weak_line_equivalent_width_matches_hand_computed_limit(fine_wave, one_line):
    lines = one_line
    tau0, b, _ = _line_params(SUN, lines)
    assert tau0[0] == pytest.approx(1e-3, rel=1e-4)
    b_hand = math.sqrt(synth.THERMAL_B2 * SUN[0] / 55.845 + synth.XI_REF**2)
    assert b[0] == pytest.approx(b_hand, rel=1e-5)
    # for tau0 << 1: W = tau0 * integral of exp(-(v/b)^2) dv = tau0 sqrt(pi) b [km/s]
    ew_hand = tau0[0] * math.sqrt(math.pi) * b_hand * LINE_WAVE / C_KMS  # [A]
    flux = synth.synthesize(SUN, wavelength=fine_wave, linelist=lines)
    assert _ew_angstrom(fine_wave, flux) == pytest.approx(ew_hand, rel=5e-3)


def test_curve_of_growth_linear_then_saturated(fine_wave, one_line):
    shifts = np.arange(-1.0, 6.0, 1.0)  # added to log gf: tau0 = 1e-4 ... 1e2
    ews = []
    for d in shifts:
        lines = one_line._replace(log_gf=one_line.log_gf + d)
        flux = synth.synthesize(SUN, wavelength=fine_wave, linelist=lines)
        ews.append(_ew_angstrom(fine_wave, flux))
    slope = np.diff(np.log10(ews)) / np.diff(shifts)
    assert np.all(slope > 0)  # the line always grows ...
    assert slope[0] == pytest.approx(1.0, abs=0.01)  # ... linearly when weak
    assert slope[-1] < 0.2  # ... and hardly at all when saturated


def test_broadening_conserves_ew_and_adds_fwhm_in_quadrature(fine_wave, one_line):
    lines = one_line
    _, b, _ = _line_params(SUN, lines)
    fwhm_doppler = 2.0 * math.sqrt(math.log(2.0)) * b[0]
    for resolution in (22500.0, 10000.0):
        labels = np.array([[*SUN[:4], vm] for vm in (0.0, 10.0, 25.0)])
        flux = synth.synthesize(
            labels, wavelength=fine_wave, linelist=lines, resolution=resolution
        )
        ew = _ew_angstrom(fine_wave, flux)
        np.testing.assert_allclose(ew, ew[0], rtol=2e-3)
        for lab, f in zip(labels, flux, strict=True):
            expected = math.sqrt(
                (C_KMS / resolution) ** 2 + lab[4] ** 2 + fwhm_doppler**2
            )
            assert _fwhm_kms(fine_wave, f, LINE_WAVE) == pytest.approx(
                expected, rel=0.02
            )


def test_cooler_stars_have_stronger_molecular_bands(window):
    wave, lines = window
    mol = _only(lines, ["CO", "OH"])
    labels = np.array([[t, 2.5, 0.0, 0.0, 5.0] for t in (4200.0, 5000.0, 5800.0)])
    ew = _ew_angstrom(wave, synth.synthesize(labels, wavelength=wave, linelist=mol))
    assert ew[0] > 3.0 * ew[1] > 9.0 * ew[2]
    assert ew[2] < 0.1 * ew[0]


def test_metallicity_deepens_fe_lines(window):
    wave, lines = window
    fe = _only(lines, ["Fe I"])
    labels = np.array([[5000.0, 3.0, feh, 0.0, 5.0] for feh in (-1.5, -0.5, 0.4)])
    flux = synth.synthesize(labels, wavelength=wave, linelist=fe)
    ew = _ew_angstrom(wave, flux)
    assert np.all(np.diff(ew) > 0)
    assert np.all(flux[2] <= flux[1] + 1e-6) and np.all(flux[1] <= flux[0] + 1e-6)


def test_alpha_deepens_mg_si_lines_but_not_fe_lines(window):
    wave, lines = window
    labels = np.array([[5000.0, 3.0, -0.5, afe, 5.0] for afe in (-0.2, 0.2, 0.6)])
    ew_alpha = _ew_angstrom(
        wave,
        synth.synthesize(
            labels, wavelength=wave, linelist=_only(lines, ["Mg I", "Si I"])
        ),
    )
    assert np.all(np.diff(ew_alpha) > 0.02 * ew_alpha[0])
    flux_fe = synth.synthesize(labels, wavelength=wave, linelist=_only(lines, ["Fe I"]))
    np.testing.assert_allclose(flux_fe[1:], flux_fe[[0, 0]], atol=1e-6)


def test_ionised_lines_strengthen_at_low_gravity(window):
    wave, _ = window
    fe2 = synth.make_linelist(400, seed=0)
    fe2 = fe2.select(np.flatnonzero(fe2.species_names == "Fe II")[:1])
    fe2 = fe2._replace(wavelength=np.array([15600.0]))
    labels = np.array([[5800.0, g, 0.0, 0.0, 5.0] for g in (4.5, 3.0, 1.5)])
    ew = _ew_angstrom(wave, synth.synthesize(labels, wavelength=wave, linelist=fe2))
    assert np.all(np.diff(ew) > 0)


# --- label sampling -----------------------------------------------------------------
@pytest.mark.parametrize("method", ["lhs", "uniform"])
def test_sample_labels_in_box_and_seeded(method):
    lo, hi = synth.DEFAULT_BOX
    x = synth.sample_labels(64, method=method, seed=5)
    assert x.shape == (64, 5)
    assert np.all(x >= lo) and np.all(x <= hi)
    np.testing.assert_array_equal(x, synth.sample_labels(64, method=method, seed=5))
    assert not np.array_equal(x, synth.sample_labels(64, method=method, seed=6))


def test_latin_hypercube_has_one_sample_per_stratum():
    n = 37
    lo, hi = np.array([0.0, -1.0, 10.0]), np.array([1.0, 1.0, 20.0])
    x = synth.sample_labels(n, box=(lo, hi), method="lhs", seed=0)
    strata = np.floor((x - lo) / (hi - lo) * n).astype(int)
    for j in range(3):
        np.testing.assert_array_equal(np.sort(strata[:, j]), np.arange(n))


# --- bad input ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("labels", "match"),
    [
        ([5800.0, np.nan, 0.0, 0.0, 5.0], r"labels\[1\] \(logg\) = nan"),
        (
            [[5800.0, 4.4, 0.0, 0.0, 5.0], [5800.0, 4.4, np.inf, 0.0, 5.0]],
            r"labels\[1, 2\] \(\[Fe/H\]\) = inf",
        ),
        (
            [8000.0, 4.4, 0.0, 0.0, 5.0],
            r"\(Teff\) = 8000.0 is outside .*4000, 7000\] K",
        ),
        (
            [[5800.0, 4.4, 0.0, 0.0, 45.0]],
            r"labels\[0, 4\] \(vmacro\) = 45.0 is outside",
        ),
        ([5800.0, 4.4, 0.0, 0.0], r"shape \(4,\)"),
        (np.zeros((2, 6)), r"shape \(2, 6\)"),
        (np.zeros((1, 2, 5)), "dimension"),
        ("hot", "numeric"),
    ],
)
def test_bad_labels_raise_naming_the_problem(labels, match):
    with pytest.raises(ValueError, match=match):
        synth.synthesize(labels)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="resolution"):
        synth.synthesize(SUN, resolution=-5.0)
    with pytest.raises(ValueError, match="batch_size"):
        synth.synthesize(SUN, batch_size=0)
    with pytest.raises(ValueError, match="increasing"):
        synth.synthesize(SUN, wavelength=[16001.0, 16000.0, 16002.0])
    with pytest.raises(ValueError, match="method"):
        synth.sample_labels(10, method="sobol")
    with pytest.raises(ValueError, match="n must be"):
        synth.sample_labels(0)
    with pytest.raises(ValueError, match="n_lines"):
        synth.make_linelist(0)
    with pytest.raises(ValueError, match="wavelength_range"):
        synth.make_linelist(10, wavelength_range=(17000.0, 15000.0))
    lines = synth.make_linelist(10)
    with pytest.raises(ValueError, match=r"linelist.species\[0\]"):
        synth.synthesize(SUN, linelist=lines._replace(species=lines.species + 100))
    with pytest.raises(ValueError, match=r"linelist.log_gf\[3\]"):
        gf = lines.log_gf.copy()
        gf[3] = np.nan
        synth.synthesize(SUN, linelist=lines._replace(log_gf=gf))


# --- make_grid ----------------------------------------------------------------------
def test_make_grid_round_trips_through_save_and_load(tmp_path, window):
    wave, _ = window
    grid = synth.make_grid(
        6, seed=2, n_lines=300, wavelength=wave, batch_size=4, progress=False
    )
    assert isinstance(grid, SpectralGrid)
    assert grid.label_names == synth.DEFAULT_LABEL_NAMES
    assert grid.label_units == synth.DEFAULT_LABEL_UNITS
    assert grid.flux.shape == (6, wave.size)
    np.testing.assert_array_equal(grid.labels, synth.sample_labels(6, seed=2))
    assert grid.meta["generator"] == "payne_lite.grid.synth"
    assert grid.meta["n_lines"] == 300 and grid.meta["seed"] == 2
    assert "payne_lite_version" in grid.meta
    path = tmp_path / "grid.h5"
    grid.save(path)
    back = SpectralGrid.load(path)
    np.testing.assert_array_equal(back.wavelength, grid.wavelength)
    np.testing.assert_array_equal(back.labels, grid.labels)
    np.testing.assert_array_equal(back.flux, grid.flux)
    assert back.label_names == grid.label_names
    assert back.label_units == grid.label_units
    assert back.meta == grid.meta
