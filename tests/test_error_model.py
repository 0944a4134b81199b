"""The one error model (payne_lite.observe._noise): flux errors, the emulator's
per-pixel error and its correlated part as ``C = diag(D) + U^T U``, handled with the
Woodbury identity; checked against dense NumPy linear algebra, in the samplers'
log likelihood, and the point fits' sandwich covariance under it."""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_NAMES, doppler_interp
from test_fit import N_PIX, reference_spectra, smooth_emulator

from payne_lite import fit, log_posterior
from payne_lite.constants import C_KMS
from payne_lite.errors import ErrorModelWarning
from payne_lite.observe import (
    ErrorModel,
    build_error_model,
    build_obs_model,
    diagonal_variance,
    log_det,
    low_rank_pieces,
    observe,
    observe_jac,
    woodbury_information,
)


def _case(seed=0, n_pix=200, k=5, n_par=4):
    """Random D (some pixels unused), U, residuals and a Jacobian (float64)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0.5, 2.0, n_pix) * 1e-4
    d[rng.choice(n_pix, 20, replace=False)] = 0.0  # unused pixels
    u = 0.01 * rng.standard_normal((k, n_pix))
    r = 0.02 * rng.standard_normal(n_pix)
    jac = rng.standard_normal((n_par, n_pix))
    return d, u, r, jac


def _dense(d, u):
    """(good (P,), C^-1 over the good pixels) by numpy.linalg."""
    good = d > 0
    c = np.diag(d[good]) + u[:, good].T @ u[:, good]
    return good, np.linalg.inv(c)


def test_woodbury_chi2_normal_and_logdet_equal_the_dense_ones():
    """r^T C^-1 r, J^T C^-1 J, J^T C^-1 r and log det C (P = 200, K = 5, float64)
    equal numpy.linalg's on the used pixels' dense covariance."""
    d, u, r, jac = _case()
    good, ci = _dense(d, u)
    em = build_error_model(d, u)
    with jax.enable_x64(True):
        em64 = ErrorModel(jnp.asarray(em.d_inv), jnp.asarray(em.v))
        chi2 = float(em64.chi2(jnp.asarray(r)))
        c2, a, g = em64.normal(jnp.asarray(jac), jnp.asarray(r))
    rg, jg = r[good], jac[:, good]
    np.testing.assert_allclose(chi2, rg @ ci @ rg, rtol=1e-10)
    np.testing.assert_allclose(float(c2), chi2, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(a), jg @ ci @ jg.T, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(g), jg @ ci @ rg, rtol=1e-9, atol=1e-9)
    c = np.diag(d[good]) + u[:, good].T @ u[:, good]
    np.testing.assert_allclose(log_det(d, u), np.linalg.slogdet(c)[1], rtol=1e-10)
    # the pieces summed by the point fits give the same J^T C^-1 J (D built from a
    # data variance and an emulator variance partly held by U)
    var_emu = np.sum(u * u, axis=0) + 3e-5
    dd = diagonal_variance(d, var_emu, u)
    np.testing.assert_allclose(dd[good], d[good] + 3e-5)
    with jax.enable_x64(True):
        pieces = low_rank_pieces(
            jnp.asarray(jac), jnp.asarray(d), jnp.asarray(var_emu), jnp.asarray(u)
        )
    info = woodbury_information(*(np.asarray(x)[None] for x in pieces))[0]
    _, ci2 = _dense(dd, u)
    np.testing.assert_allclose(info, jg @ ci2 @ jg.T, rtol=1e-9)


def test_masked_pixels_drop_out():
    """Whatever the flux, residual or basis at unused pixels (1 / D = 0), chi2 is
    the used pixels' own; without a basis the model is the diagonal one."""
    d, u, r, _ = _case(seed=1)
    bad = d == 0
    em = build_error_model(d, u)
    u2, r2 = u.copy(), r.copy()
    u2[:, bad] = 1e3
    r2[bad] = 1e3
    em2 = build_error_model(d, u2)
    assert np.all(em.d_inv[bad] == 0) and np.all(em2.v[:, bad] == 0)
    np.testing.assert_allclose(
        float(em2.chi2(jnp.asarray(r2))), float(em.chi2(jnp.asarray(r))), rtol=1e-5
    )
    diag = build_error_model(d)
    assert diag.v is None
    np.testing.assert_allclose(
        float(diag.chi2(jnp.asarray(r))),
        np.sum(np.where(bad, 0.0, r * r / np.where(bad, 1.0, d))),
        rtol=1e-5,
    )


def _emulator_with_basis(seed=13, k=4, wavelength=None):
    """The smooth test emulator (on ``wavelength``, default its own linear grid)
    with a smooth correlated error (K = ``k``) and a per-pixel error a little above
    the basis's diagonal."""
    emu = smooth_emulator(wavelength=wavelength)
    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, N_PIX)
    basis = 0.003 * np.sin(2 * np.pi * np.outer(rng.uniform(1, 6, k), x) + 1.0)
    pe = np.sqrt(np.sum(basis**2, axis=0) + 0.001**2)
    return dataclasses.replace(emu, pixel_error=pe, error_basis=basis), basis, pe


def two_noisy_stars(e):
    """Two noisy spectra of ``e`` (S/N 200, rv -35 and 50 km/s), their errors and a
    mask of the 25 pixels at each end: ``(flux, err, mask)``."""
    rng = np.random.default_rng(13)
    mask = np.zeros(N_PIX, bool)
    mask[:25] = mask[-25:] = True
    s, rv = rng.uniform(-0.3, 0.3, (2, 3)), np.array([-35.0, 50.0])
    flux = reference_spectra(e, s, rv)
    err = np.full_like(flux, 0.005)
    return flux + err * rng.standard_normal(flux.shape), err, mask


def _dense_c(e, basis, pe, err, keep, rv, cont=None):
    """(U_s (K, P), C over ``keep``) as numpy builds them: the basis (as the model)
    and the per-pixel error (linearly) at lambda / f(rv), D = err^2 + max(pe^2 - diag(U^T U), 0)."""
    f = np.sqrt((1 + rv / C_KMS) / (1 - rv / C_KMS))
    lam = e.wavelength / f
    pe_s = np.interp(lam, e.wavelength, pe, left=0.0, right=0.0)
    # the basis moves with the model, by the fitter's interpolant (conftest's
    # reference; np.interp where its taps leave the grid: those pixels are masked)
    b_s = np.stack(
        [
            np.where(np.isnan(c), np.interp(lam, e.wavelength, b), c)
            for b, c in zip(
                basis, doppler_interp(lam, e.wavelength, basis), strict=True
            )
        ]
    )
    if cont is not None:
        b_s = b_s * cont
    dd = err**2 + np.maximum(pe_s**2 - np.sum(b_s**2, axis=0), 0.0)
    ug = b_s[:, keep]
    return b_s, np.diag(dd[keep]) + ug.T @ ug


def test_sampler_log_likelihood_is_the_dense_gaussian():
    """log_posterior (box prior: -chi2 / 2, the constant log det C left out) with an
    error basis equals -1/2 r^T C^-1 r with the dense C built by numpy."""
    e, basis, pe = _emulator_with_basis()
    rng = np.random.default_rng(3)
    mask = np.zeros(N_PIX, bool)
    mask[:25] = mask[-25:] = True  # valid for any rv of the window
    mask[200:210] = True
    s, rv = rng.uniform(-0.3, 0.3, 3), 30.0
    flux = reference_spectra(e, s[None], np.array([rv]))[0]
    err = np.full(N_PIX, 0.004)
    flux = flux + err * rng.standard_normal(N_PIX)
    pts = np.array([np.r_[e.unscale(s), rv], np.r_[e.unscale(s + 0.01), rv + 0.5]])
    lp = log_posterior(flux, err, e, pts, rv_centre=rv, mask=mask)
    keep = ~mask
    _, c = _dense_c(e, basis, pe, err, keep, rv)
    obs = build_obs_model(e)
    for i, pt in enumerate(pts):
        p = np.r_[e.scale(pt[:3]), pt[3]]
        model = np.asarray(observe(obs, jnp.asarray(p, jnp.float32))[0], np.float64)
        r = (model - flux)[keep]
        np.testing.assert_allclose(lp[i], -0.5 * r @ np.linalg.solve(c, r), rtol=2e-4)
    # with a continuum (cont_deg=1) and none in the centre, the basis is placed
    # with a flat one: at c = (1, 0) the same model and the same value
    lp_c = log_posterior(flux, err, e, np.r_[pts[0], 1.0, 0.0][None], rv_centre=rv,
                         mask=mask, cont_deg=1)  # fmt: skip
    np.testing.assert_allclose(lp_c[0], lp[0], rtol=2e-4)
    # without the basis: the per-pixel quadrature weights, as before
    plain = dataclasses.replace(e, error_basis=None)
    lp0 = log_posterior(flux, err, plain, pts[:1], rv_centre=rv, mask=mask)
    p = np.r_[e.scale(pts[0, :3]), rv]
    model = np.asarray(observe(obs, jnp.asarray(p, jnp.float32))[0], np.float64)
    f = np.sqrt((1 + rv / C_KMS) / (1 - rv / C_KMS))
    pe_s = np.interp(e.wavelength / f, e.wavelength, pe, left=0.0, right=0.0)
    chi2 = np.sum(((model - flux) ** 2 / (err**2 + pe_s**2))[keep])
    np.testing.assert_allclose(lp0[0], -0.5 * chi2, rtol=2e-4)


def test_point_fit_covariance_is_the_sandwich_of_the_error_model():
    """The LM table's covariance is the weighted estimator's scatter, the sandwich
    A^-1 J^T W C_s W J A^-1 (A = J^T W J, W = 1 / diag(C) the fit's weights) with
    C_s = diag(err^2) + U^T U: the samplers' C less the per-pixel emulator variance
    that U does not hold (the basis shifted to the fit's rv, as the samplers place
    it); without the basis (J^T W J)^-1. Not the posterior's (J^T C^-1 J)^-1,
    which is narrower here."""
    e, basis, pe = _emulator_with_basis()
    noisy, err, mask = two_noisy_stars(e)
    t = fit(noisy, err, e, mask=mask)
    plain = fit(noisy, err, dataclasses.replace(e, error_basis=None), mask=mask)
    assert t.meta["emulator_error_correlated"] is True
    assert plain.meta["emulator_error_correlated"] is False
    np.testing.assert_allclose(t["Teff"], plain["Teff"], rtol=1e-6)  # same step
    obs = build_obs_model(e)
    span = np.r_[e.label_hi - e.label_lo, 1.0]
    keep = ~mask
    for i in range(2):
        rv_i = float(t["rv"][i])
        p = np.r_[e.scale(np.array([t[n][i] for n in TINY_NAMES])), rv_i]
        _, _, jac = observe_jac(obs, jnp.asarray(p, obs.x_obs.dtype))
        j = np.asarray(jac, np.float64)[keep]
        b_s, c = _dense_c(e, basis, pe, err[i], keep, rv_i)
        u = b_s[:, keep]
        f = np.sqrt((1 + rv_i / C_KMS) / (1 - rv_i / C_KMS))
        pe_s = np.interp(e.wavelength / f, e.wavelength, pe, left=0.0, right=0.0)
        w = 1.0 / (err[i] ** 2 + pe_s**2)[keep]  # the fit's weights
        c_s = np.diag(err[i][keep] ** 2) + u.T @ u
        jw = j * w[:, None]
        ai = np.linalg.inv(j.T @ jw)
        sand = (ai @ (jw.T @ c_s @ jw) @ ai) * span[:, None] * span
        got = np.asarray(t["covariance"][i])
        np.testing.assert_allclose(got, sand, rtol=0.01, atol=1e-3 * np.sqrt(
            np.outer(np.diag(sand), np.diag(sand))).max())  # fmt: skip
        gls = np.linalg.inv(j.T @ np.linalg.solve(c, j)) * span[:, None] * span
        assert np.all(np.diag(gls)[:3] < np.diag(got)[:3])
        # here the correlated error inflates the label errors (not necessarily rv's)
        plain_var = np.diag(np.asarray(plain["covariance"][i]))
        assert np.all(np.diag(got)[:3] > 1.5 * plain_var[:3])
        jf = np.asarray(jac, np.float64)
        w0 = np.zeros(N_PIX)
        w0[keep] = w
        cov0 = np.linalg.inv(jf.T @ (w0[:, None] * jf)) * span[:, None] * span
        np.testing.assert_allclose(
            np.diag(np.asarray(plain["covariance"][i])), np.diag(cov0), rtol=0.01
        )


def _linear_toy(seed, flux_err):
    """A model exactly linear in the labels with a 3-component correlated error and
    one noisy spectrum drawn from its C (float64): ``(emulator, A (P, L), c (P,),
    C (P, P), err (P,), flux (P,))``, flux = A s + c + noise for scaled s."""
    from test_sample import linear_emulator, linear_parts

    emu = linear_emulator()
    p = emu.n_pix
    x = np.linspace(0.0, 1.0, p)
    rng = np.random.default_rng(seed)
    basis = 0.01 * np.sin(2 * np.pi * np.outer(rng.uniform(0.5, 3, 3), x) + 0.3)
    pe = np.sqrt(np.sum(basis**2, axis=0) + 0.002**2)
    e = dataclasses.replace(emu, pixel_error=pe, error_basis=basis)
    a, c0 = linear_parts(emu)
    err = np.full(p, flux_err)
    c = np.diag(err**2 + 0.002**2) + basis.T @ basis
    s_true = np.array([0.05, -0.1, 0.02])
    flux = a @ s_true + c0 + np.linalg.cholesky(c) @ rng.standard_normal(p)
    return e, a, c0, c, err, flux


@pytest.mark.slow
def test_linear_toy_lm_and_emcee_give_the_exact_posterior():
    """A model exactly linear in the labels (rv fixed) with correlated emulator
    error: the posterior is Gaussian with covariance (A^T C^-1 A)^-1 and mean
    that times A^T C^-1 (flux - c); emcee's draws recover it (sd within 6 %, mean
    within 0.12 sd). The sampler's own LM start is the GLS fit under the same C
    (its errors the posterior's); the default fit's are the per-pixel-weighted
    estimator's, the sandwich with the flux variances and U^T U, wider."""
    import warnings

    from test_sample import SPAN

    import payne_lite as pl
    from payne_lite.errors import SamplingWarning

    e, a, c0, c, err, flux = _linear_toy(2, 0.01)
    basis, pe = e.error_basis, e.pixel_error
    prec = a.T @ np.linalg.solve(c, a)
    cov = np.linalg.inv(prec)
    mean = e.unscale(cov @ a.T @ np.linalg.solve(c, flux - c0))
    cov = cov * SPAN[:, None] * SPAN[None, :]
    sd = np.sqrt(np.diag(cov))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SamplingWarning)
        t = pl.sample(
            flux, err, e, fixed={"rv": 0.0}, seed=1,
            options=pl.EmceeOptions(n_walkers=24, n_steps=2000, check_every=500),
        )  # fmt: skip
    w = 1.0 / (err**2 + pe**2)
    aw = a * w[:, None]
    ai = np.linalg.inv(a.T @ aw)
    meat = aw.T @ (np.diag(err**2) + basis.T @ basis) @ aw
    sand = (ai @ meat @ ai) * SPAN[:, None] * SPAN[None, :]
    lm_err = np.array([float(t[f"{n}_lm_err"][0]) for n in TINY_NAMES])
    np.testing.assert_allclose(lm_err, sd, rtol=2e-3)  # the sampler's LM: GLS
    wls = pl.fit(flux, err, e, fixed={"rv": 0.0})
    wls_err = np.array([float(wls[f"{n}_err"][0]) for n in TINY_NAMES])
    np.testing.assert_allclose(wls_err, np.sqrt(np.diag(sand)), rtol=2e-3)
    assert np.all(sd < wls_err)
    got_sd = np.array([float(t[f"{n}_std"][0]) for n in TINY_NAMES])
    got_mean = np.array([float(t[f"{n}_p50"][0]) for n in TINY_NAMES])
    np.testing.assert_allclose(got_sd, sd, rtol=0.06)
    assert np.all(np.abs(got_mean - mean) < 0.12 * sd), (got_mean - mean) / sd


@pytest.mark.parametrize("method", ["lm", "curve_fit"])
def test_gls_estimator_of_a_linear_model_is_the_exact_posterior(method):
    """A model exactly linear in the labels (rv fixed), C = diag(err^2 + pe^2 -
    diag U^T U) + U^T U: estimator="gls" (after the LM or curve_fit) returns the
    GLS estimate (A^T C^-1 A)^-1 A^T C^-1 (flux - c) and covariance
    (A^T C^-1 A)^-1, the Gaussian posterior, worked here by dense NumPy (float64);
    chi2 is r^T C^-1 r."""
    from test_sample import SPAN

    import payne_lite as pl

    e, a, c0, c, err, flux = _linear_toy(4, 0.002)
    cov = np.linalg.inv(a.T @ np.linalg.solve(c, a))
    mean_s = cov @ a.T @ np.linalg.solve(c, flux - c0)
    cls = pl.LMOptions if method == "lm" else pl.CurveFitOptions
    with pytest.warns(ErrorModelWarning, match="error_basis of 3 components"):
        t = pl.fit(flux, err, e, fixed={"rv": 0.0}, method=method,
                   options=cls(estimator="gls"))  # fmt: skip
    w = pl.fit(flux, err, e, fixed={"rv": 0.0}, method=method)
    assert t.meta["estimator"] == "gls" and w.meta["estimator"] == "wls"
    assert t.meta["emulator_error_correlated"] is True
    sd = np.sqrt(np.diag(cov)) * SPAN
    got = np.array([float(t[n][0]) for n in TINY_NAMES])
    assert np.all(np.abs(got - e.unscale(mean_s)) < 0.01 * sd), (
        got - e.unscale(mean_s)
    ) / sd
    np.testing.assert_allclose(
        np.asarray(t["covariance"][0])[:3, :3],
        cov * SPAN[:, None] * SPAN[None, :],
        rtol=2e-3,
        atol=1e-4 * sd.max() ** 2,
    )
    r = flux - a @ mean_s - c0
    np.testing.assert_allclose(
        float(t["chi2"][0]), r @ np.linalg.solve(c, r), rtol=2e-3
    )
    assert t["flags"][0] == 0
    # the per-pixel-weighted fit is another estimate, with wider errors here
    lm_err = np.array([float(w[f"{n}_err"][0]) for n in TINY_NAMES])
    assert np.all(sd < 0.8 * lm_err), sd / lm_err
    assert np.any(
        np.abs(got - np.array([float(w[n][0]) for n in TINY_NAMES])) > 0.1 * sd
    )


def _with_local_error(e, n_held=40, neighbours=6, seed=5):
    """``e`` with a LocalError of ``n_held`` smooth error patterns (a sine each, of
    its own frequency, phase and amplitude) at random labels, so that the
    neighbours of different labels differ."""
    from payne_lite.emulator import LocalError

    rng = np.random.default_rng(seed)
    x = np.linspace(0.0, 1.0, e.n_pix)
    f, ph, amp = (
        rng.uniform(1, 8, n_held),
        rng.uniform(0, 6, n_held),
        rng.uniform(0.002, 0.006, n_held),
    )
    errors = amp[:, None] * np.sin(2 * np.pi * np.outer(f, x) + ph[:, None])
    scaled = rng.uniform(-0.5, 0.5, (n_held, e.n_labels))
    shifts = rng.uniform(-1.0, 1.0, n_held)  # [km/s]: the rv term is exercised
    loc = LocalError(errors, scaled, neighbours, shifts=shifts)
    return dataclasses.replace(e, local_error=loc)


def _dense_local_c(e, basis, pe, err, keep, rv, s, cont=None):
    """C over ``keep`` of ``e``'s LocalError at scaled labels ``s`` (numpy): the
    neighbours (brute force) times (1 - a) / m plus a times the global model
    (``basis``, per-pixel rest of ``pe``), and the flux variances; without the
    Doppler term (the neighbours' mean squared shift, returned third)."""
    held = e.local_error
    m, a = held.neighbours, held.shrink
    near = np.argsort(np.sum((held.scaled - s) ** 2, axis=1))[:m]
    u_near = held.errors[near].astype(np.float64) * np.sqrt((1 - a) / m)
    _, c_near = _dense_c(e, u_near, np.zeros(e.n_pix), err, keep, rv, cont)
    zero = np.zeros_like(err)
    _, c_glob = _dense_c(e, np.sqrt(a) * basis, np.sqrt(a) * pe, zero, keep, rv, cont)
    return near, c_near + c_glob, float(np.mean(held.shifts[near] ** 2))


@pytest.mark.parametrize("grid", ["linear", "log", "log+continuum", "log+local"])
def test_gls_estimator_minimises_the_dense_chi2_of_the_shifted_model(grid):
    """The non-linear case, rv free: the GLS fit of each of two noisy stars (flux
    noise plus a draw of the correlated error) is the minimum of r^T C^-1 r with
    the dense C placed at the least-squares fit's rv (as the fitter holds it) and
    the model by NumPy (conftest's interpolant), found by scipy; its covariance is
    (J^T C^-1 J)^-1 there, narrower than the sandwich. On a log grid with a chip
    gap the fitter sums over the observed span (shift_span), on a linear grid over
    the pixels (basis_on); with a linear continuum (cont_deg=1) the basis is times
    the fit's continuum, as the model. With a LocalError, C's low-rank part is the
    mean outer product of the held-out errors nearest the least-squares fit's
    labels, and it holds all of the emulator's error (D = err^2)."""
    from contextlib import nullcontext

    from scipy.linalg import cho_factor, cho_solve, solve_triangular
    from scipy.optimize import least_squares
    from test_fit import log_wavelength

    from payne_lite import LMOptions

    e, basis, pe = _emulator_with_basis(
        wavelength=log_wavelength() if grid.startswith("log") else None
    )
    local = grid.endswith("local")
    if local:
        e = _with_local_error(e)
    noisy, err, mask = two_noisy_stars(e)
    if grid.startswith("log"):  # pixels whose taps may cross the gap: left out
        mask = mask.copy()
        mask[120:180] = True
    n_cont = 2 if grid.endswith("continuum") else 0
    x = 2 * (e.wavelength - e.wavelength[0]) / np.ptp(e.wavelength) - 1
    if n_cont:  # the stars times 1.1 +- 0.05 x
        noisy, err = noisy * (1.1 + 0.05 * x), err * 1.1
    rng = np.random.default_rng(21)
    noisy = noisy + rng.standard_normal((2, basis.shape[0])) @ basis
    kw = dict(mask=mask, cont_deg=n_cont - 1) if n_cont else dict(mask=mask)
    w = fit(noisy, err, e, **kw)
    # the toy's 4 components (exact here) warn; a local model does not
    with nullcontext() if local else pytest.warns(ErrorModelWarning):
        t = fit(noisy, err, e, options=LMOptions(estimator="gls"), **kw)
    assert t.meta["emulator_error_local"] is local
    obs = build_obs_model(e, cont_deg=max(n_cont - 1, 0))
    cont_names = [f"cont_{j}" for j in range(n_cont)]
    span = np.r_[e.label_hi - e.label_lo, np.ones(1 + n_cont)]
    keep = ~mask
    for i in range(2):
        rv_c = float(w["rv"][i])
        c_c = [float(w[n][i]) for n in cont_names]
        cont = np.polynomial.chebyshev.chebval(x, c_c) if n_cont else None
        s2 = 0.0
        if local:  # at the least-squares fit's labels
            s_w = e.scale(np.array([w[n][i] for n in TINY_NAMES]))
            _, c, s2 = _dense_local_c(e, basis, pe, err[i], keep, rv_c, s_w, cont)
        else:
            _, c = _dense_c(e, basis, pe, err[i], keep, rv_c, cont=cont)
        chol = np.linalg.cholesky(c)

        def resid(x, i=i, chol=chol):
            co = x[4:] if n_cont else None
            m = reference_spectra(e, x[None, :3], x[3:4], cont=co)[0]
            return solve_triangular(chol, (noisy[i] - m)[keep], lower=True)

        x0 = np.r_[e.scale(np.array([w[n][i] for n in TINY_NAMES])), rv_c, c_c]
        # float32 model: difference steps of 1e-3 (1e-6 stalls 11 chi2 short)
        ref = least_squares(resid, x0, method="lm", diff_step=1e-3, xtol=1e-10,
                            ftol=1e-12)  # fmt: skip
        _, _, jac = observe_jac(obs, jnp.asarray(ref.x, obs.x_obs.dtype))
        j = np.asarray(jac, np.float64)[keep]
        cov = np.linalg.inv(j.T @ cho_solve(cho_factor(c), j)) * span[:, None] * span
        # a local model's Doppler term: C + s2 d d^T, d the rv column of J: the
        # same minimum, s2 more rv variance
        cov[3, 3] += s2
        sd = np.sqrt(np.diag(cov))
        got = np.r_[[t[n][i] for n in TINY_NAMES], t["rv"][i],
                    [t[n][i] for n in cont_names]]  # fmt: skip
        want = np.r_[e.unscale(ref.x[:3]), ref.x[3:]]
        assert np.all(np.abs(got - want) < 0.05 * sd), (got - want) / sd
        np.testing.assert_allclose(np.asarray(t["covariance"][i]), cov, rtol=0.02,
                                   atol=1e-3 * sd.max() ** 2)  # fmt: skip
        np.testing.assert_allclose(float(t["chi2"][i]), 2 * ref.cost, rtol=0.01)
        wls = np.array([float(w[f"{n}_err"][i]) for n in TINY_NAMES])
        assert local or np.all(sd[:3] < wls), sd[:3] / wls
    assert np.all(t["flags"] == 0)


def _dense_joint_c(e, basis, pe, err, keep, rvs, s=None):
    """(C over ``keep`` of every visit, stacked; the Doppler term's s2) of one star's
    visits at ``rvs``: each visit's D, and one rest-frame U (the basis, or with
    ``s`` the LocalError's rows at scaled labels ``s``) placed at each visit's rv,
    so the visits' blocks share it."""
    us, ds, s2 = [], [], 0.0
    for v, rv in enumerate(rvs):
        if s is None:
            b, c = _dense_c(e, basis, pe, err[v], keep, rv)
            u = b[:, keep]
        else:
            held = e.local_error
            m, a = held.neighbours, held.shrink
            near = np.argsort(np.sum((held.scaled - s) ** 2, axis=1))[:m]
            u_near = held.errors[near].astype(np.float64) * np.sqrt((1 - a) / m)
            b1, c1 = _dense_c(e, u_near, np.zeros(e.n_pix), err[v], keep, rv)
            zero = np.zeros_like(err[v])
            b2, c2 = _dense_c(e, np.sqrt(a) * basis, np.sqrt(a) * pe, zero, keep, rv)
            u, c = np.vstack([b1[:, keep], b2[:, keep]]), c1 + c2
            s2 = float(np.mean(held.shifts[near] ** 2))
        us.append(u)
        ds.append(np.diag(np.diag(c - u.T @ u)))
    u = np.hstack(us)
    n = keep.sum()
    c = u.T @ u
    for v, d in enumerate(ds):
        c[v * n : (v + 1) * n, v * n : (v + 1) * n] += d
    return c, s2


@pytest.mark.parametrize("local", [False, True])
def test_gls_joint_fit_of_visits_minimises_the_dense_chi2(local):
    """Joint fits of visits (group=) with estimator='gls': the emulator's error is
    the star's, one rest-frame draw placed at each visit's rv, so C couples the
    visits. The fit is the minimum over (labels, rv_1, rv_2) of r^T C^-1 r with the
    dense joint C (both visits' pixels; the basis placed at the least-squares joint
    fit's rvs) and the model by NumPy, found by scipy; its covariance (J^T C^-1
    J)^-1 there, with a LocalError plus its Doppler variance along rv_1 + rv_2
    (the star's zero point moves every visit)."""
    from scipy.linalg import cho_factor, cho_solve, solve_triangular
    from scipy.optimize import least_squares

    from payne_lite import LMOptions

    e, basis, pe = _emulator_with_basis()
    if local:
        e = _with_local_error(e)
    rng = np.random.default_rng(8)
    mask = np.zeros(N_PIX, bool)
    mask[:25] = mask[-25:] = True
    keep = ~mask
    s_true, rvs = rng.uniform(-0.3, 0.3, 3), np.array([-35.0, 50.0])
    flux = reference_spectra(e, np.tile(s_true, (2, 1)), rvs)
    err = np.full_like(flux, 0.005)
    z = rng.standard_normal(basis.shape[0])  # one draw of the star's error
    for v in range(2):
        flux[v] += z @ _dense_c(e, basis, pe, err[v], keep, rvs[v])[0]
    flux += err * rng.standard_normal(flux.shape)
    group = np.array([7, 7])
    w = fit(flux, err, e, mask=mask, group=group)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ErrorModelWarning)  # the toy's 4 components
        t = fit(
            flux, err, e, mask=mask, group=group, options=LMOptions(estimator="gls")
        )
    # bit 9 (a localised misfit) may be set: max_dip weighs each visit's residuals
    # by the per-pixel errors alone, and the draw of the correlated error (C's
    # U^T U part) makes coherent sums over 5 pixels
    assert t.meta["estimator"] == "gls" and t["flags"][0] & ~512 == 0
    rv_c = np.asarray(w["rv"][0], np.float64)
    s_c = e.scale(np.array([w[n][0] for n in TINY_NAMES])) if local else None
    c, s2 = _dense_joint_c(e, basis, pe, err, keep, rv_c, s_c)
    chol = np.linalg.cholesky(c)

    def resid(x):
        m = reference_spectra(e, np.tile(x[:3], (2, 1)), x[3:5])
        return solve_triangular(chol, (flux - m)[:, keep].ravel(), lower=True)

    x0 = np.r_[e.scale(np.array([w[n][0] for n in TINY_NAMES])), rv_c]
    ref = least_squares(resid, x0, method="lm", diff_step=1e-3, xtol=1e-10,
                        ftol=1e-12)  # fmt: skip
    obs = build_obs_model(e)
    jac = np.zeros((2 * keep.sum(), 5))
    for v in range(2):
        _, _, jv = observe_jac(obs, jnp.asarray(ref.x[[0, 1, 2, 3 + v]], jnp.float32))
        jv = np.asarray(jv, np.float64)[keep]
        rows = slice(v * keep.sum(), (v + 1) * keep.sum())
        jac[rows, :3], jac[rows, 3 + v] = jv[:, :3], jv[:, 3]
    span = np.r_[e.label_hi - e.label_lo, 1.0, 1.0]
    cov = np.linalg.inv(jac.T @ cho_solve(cho_factor(c), jac)) * span[:, None] * span
    cov[3:5, 3:5] += s2  # 0 without a LocalError
    sd = np.sqrt(np.diag(cov))
    got = np.r_[[t[n][0] for n in TINY_NAMES], np.asarray(t["rv"][0])]
    want = np.r_[e.unscale(ref.x[:3]), ref.x[3:]]
    assert np.all(np.abs(got - want) < 0.05 * sd), (got - want) / sd
    np.testing.assert_allclose(np.asarray(t["covariance"][0]), cov, rtol=0.02,
                               atol=1e-3 * sd.max() ** 2)  # fmt: skip
    # the visits' coupling is small beside the noise here (K = 4 smooth
    # components), but chi2 tells it: C without its cross-visit blocks misses
    n = keep.sum()
    block = c.copy()
    block[:n, n:] = block[n:, :n] = 0.0
    r = resid(ref.x)
    r = (chol @ r) @ cho_solve(cho_factor(block), chol @ r)
    assert abs(r / (2 * ref.cost) - 1) > 2e-3
    np.testing.assert_allclose(float(t["chi2"][0]), 2 * ref.cost, rtol=5e-4)


def test_gls_estimator_needs_a_basis():
    from payne_lite import LMOptions

    with pytest.raises(ValueError, match="estimator must be one of"):
        LMOptions(estimator="ols")
    e, _, _ = _emulator_with_basis()
    noisy, err, mask = two_noisy_stars(e)
    opts = LMOptions(estimator="gls")
    plain = dataclasses.replace(e, error_basis=None)
    with pytest.raises(ValueError, match="needs the emulator's correlated error"):
        fit(noisy, err, plain, mask=mask, options=opts)
    with pytest.raises(ValueError, match="needs the emulator's correlated error"):
        fit(noisy, err, e, mask=mask, options=opts, emulator_error=False)
    with pytest.warns(ErrorModelWarning):  # a joint fit warns alike
        fit(noisy, err, e, mask=mask, options=opts, group=np.array([0, 0]))
    # a basis of GLS_MIN_RANK components or more: no warning
    big = dataclasses.replace(
        e, error_basis=np.tile(e.error_basis / 32.0, (32, 1)), error_scale=None
    )
    t = fit(noisy[:1], err[:1], big, mask=mask, options=opts)
    assert t.meta["estimator"] == "gls"


def _held_out_files(tmp_path):
    """``(emulator, grid)``: the toy emulator with a basis and 60 held-out spectra
    of it less a draw of its correlated error, saved as e.h5 and held.h5."""
    from conftest import TINY_UNITS

    import payne_lite as pl

    e, basis, _ = _emulator_with_basis()
    rng = np.random.default_rng(8)
    labels = e.unscale(rng.uniform(-0.5, 0.5, (60, 3)))
    flux = e.predict(labels) - rng.standard_normal((60, basis.shape[0])) @ basis
    grid = pl.SpectralGrid(wavelength=e.wavelength, labels=labels, flux=flux,
                           label_names=TINY_NAMES, label_units=TINY_UNITS)  # fmt: skip
    grid.save(tmp_path / "held.h5")
    e.save(tmp_path / "e.h5")
    return e, grid


def _cli_gls_fit(tmp_path, e, emulator_file):
    """The table of ``payne-lite fit`` with estimator gls of three tiny spectra of
    ``e`` with the emulator in ``emulator_file``."""
    import json

    from conftest import write_tiny_catalog

    import payne_lite as pl
    from payne_lite.cli import main

    write_tiny_catalog(tmp_path / "cat.h5", e, 3, noise=0.005)
    fits = tmp_path / "fits.h5"
    opts = json.dumps({"estimator": "gls"})
    assert main(["fit", str(tmp_path / "cat.h5"), "--emulator", str(emulator_file),
                 "--options", opts, "-o", str(fits), "--no-progress"]) == 0  # fmt: skip
    return pl.read_results(fits)


def test_cli_error_basis_then_a_gls_fit(tmp_path, capsys):
    """payne-lite error-basis EMULATOR GRID --rank K -o OUT writes the emulator with
    Emulator.with_error_basis's basis and says what it holds; a rank at or above
    the spectra is refused in one line; payne-lite fit --options '{"estimator":
    "gls"}' with it writes a table whose meta says gls."""
    import payne_lite as pl
    from payne_lite.cli import main

    e, grid = _held_out_files(tmp_path)
    out = tmp_path / "gls.h5"
    args = ["error-basis", str(tmp_path / "e.h5"), str(tmp_path / "held.h5")]
    assert main([*args, "--rank", "4", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "error_basis: 4 components of 60 held-out spectra" in text, text
    assert f"wrote {out}" in text
    new = pl.Emulator.load(out)
    want = e.with_error_basis(grid, rank=4)
    np.testing.assert_allclose(new.error_basis, want.error_basis, rtol=1e-6)
    assert main([*args, "--rank", "60", "-o", str(tmp_path / "x.h5")]) != 0
    err = capsys.readouterr().err
    assert "rank must be" in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.h5").exists()
    t = _cli_gls_fit(tmp_path, e, out)
    err = capsys.readouterr().err  # the CLI shows a warning as one line
    assert (
        err.count("payne-lite: warning: estimator='gls' with an error_basis of 4") == 1
    )
    assert t.meta["estimator"] == "gls" and len(t) == 3


def test_gls_estimator_treats_nan_flux_as_masked():
    """A chunk of NaN flux (and a pixel with zero error) gets no weight under GLS
    either: the same estimate and covariance as with those pixels masked."""
    from payne_lite import LMOptions

    e, basis, _ = _emulator_with_basis()
    noisy, err, mask = two_noisy_stars(e)
    bad = noisy.copy()
    bad[0, 100:130] = np.nan
    err_bad = err.copy()
    err_bad[1, 200] = 0.0
    masked = np.broadcast_to(mask, noisy.shape).copy()
    masked[0, 100:130] = True
    masked[1, 200] = True
    opts = LMOptions(estimator="gls")
    with pytest.warns(ErrorModelWarning):
        t_nan = fit(bad, err_bad, e, mask=mask, options=opts)
        t_msk = fit(noisy, err, e, mask=masked, options=opts)
    assert np.all(t_nan["flags"] == 0)
    for c in (*TINY_NAMES, "rv", "chi2"):
        np.testing.assert_allclose(t_nan[c], t_msk[c], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(t_nan["covariance"], t_msk["covariance"], rtol=1e-5)
    assert np.all(t_nan["n_good_pixels"] == t_msk["n_good_pixels"])


@pytest.mark.parametrize("cont_deg", [0, 2])
def test_basis_placer_is_basis_on_over_the_observed_span(cont_deg):
    """On a log grid with a chip gap, basis_placer's basis over the span of the
    observed pixels is basis_on's on every observed pixel the model finds valid
    (zeros between the chips), and lay() puts arrays in that layout; elsewhere
    (a linear grid) it is basis_on itself."""
    from test_fit import log_wavelength

    from payne_lite.observe import basis_on, basis_placer, span_pixels

    e, basis, _ = _emulator_with_basis(wavelength=log_wavelength())
    obs = build_obs_model(e, cont_deg=cont_deg)
    assert obs.log_grid is not None
    b = jnp.asarray(basis, obs.x_obs.dtype)
    p = np.r_[0.1, -0.2, 0.05, 37.5, [1.05, 0.02, -0.01][: cont_deg + 1]]
    p = jnp.asarray(p if cont_deg else p[:4], obs.x_obs.dtype)
    place, lay = basis_placer(obs, b)
    want = np.asarray(basis_on(obs, b, p))
    _, valid = observe(obs, p)
    got = np.asarray(span_pixels(obs, jax.jit(place)(p)))
    ok = np.asarray(valid)
    assert ok.sum() > 300
    np.testing.assert_allclose(got[:, ok], want[:, ok], rtol=1e-5, atol=1e-9)
    x = np.arange(obs.x_obs.shape[0], dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(span_pixels(obs, lay(jnp.asarray(x)))), x)
    lin, _, _ = _emulator_with_basis()
    obs_l = build_obs_model(lin)
    pl_, lay_l = basis_placer(obs_l, b)
    q = p[:4]
    np.testing.assert_array_equal(np.asarray(pl_(q)), np.asarray(basis_on(obs_l, b, q)))
    assert lay_l(x) is x


@pytest.mark.parametrize("cont_deg", [0, 2])
def test_sandwich_on_the_fast_path_equals_the_general_one(cont_deg):
    """The sandwich's pieces J^T W D W J and J^T W U^T from the LM's own rows
    (jet_rows, one-hidden-layer nets on a log grid) equal those from
    observe_jac_t's Jacobian and basis_on over the observed pixels."""
    from test_fit import log_wavelength

    from payne_lite.fitting import _lm

    e, basis, _ = _emulator_with_basis(wavelength=log_wavelength())
    obs = build_obs_model(e, cont_deg=cont_deg)
    assert obs.jet is not None
    general = dataclasses.replace(obs, jet=None)
    dt = obs.x_obs.dtype
    rng = np.random.default_rng(2)
    n = 3
    cont = np.tile([1.05, 0.02, -0.01][: cont_deg + 1], (n, 1))
    parts = [rng.uniform(-0.3, 0.3, (n, 3)), rng.uniform(-40, 40, n)]
    p = np.column_stack(parts + ([cont] if cont_deg else []))
    w = rng.uniform(1e4, 4e4, (n, obs.x_obs.shape[0]))
    w[:, :25] = w[:, -25:] = 0.0  # chip ends carry no weight
    var = np.where(w > 0, 0.7 / np.where(w > 0, w, 1.0), 0.0)
    args = [jnp.asarray(a, dt) for a in (p, w, var, basis)]
    fast = _lm._sandwich_batch(obs, *args)
    slow = _lm._sandwich_batch(general, *args)
    for f, s_ in zip(fast, slow, strict=True):
        f, s_ = np.asarray(f, np.float64), np.asarray(s_, np.float64)
        np.testing.assert_allclose(f, s_, rtol=2e-4, atol=2e-5 * np.abs(s_).max())


def test_local_error_neighbours_factor_and_refusals():
    """LocalError.nearest is the brute-force nearest set (labels clipped to the
    box), nearest first; factor's U^T U is (1 - shrink) times the mean outer
    product of those errors plus shrink times the global basis's B^T B, and the
    same rows of the stacked array; malformed inputs are refused."""
    from payne_lite.emulator import LocalError

    rng = np.random.default_rng(2)
    errors = rng.standard_normal((50, 30))
    scaled = rng.uniform(-0.5, 0.5, (50, 3))
    loc = LocalError(errors, scaled, 7)
    q = np.array([[0.1, -0.2, 0.3], [0.9, 0.0, -2.0]])  # the second is clipped
    near = loc.nearest(q)
    qc = np.clip(q, -0.5, 0.5)
    for i in range(2):
        d2 = np.sum((scaled - qc[i]) ** 2, axis=1)
        np.testing.assert_array_equal(near[i], np.argsort(d2)[:7])
    e = errors[near[0]].astype(np.float32).astype(np.float64)
    b = rng.standard_normal((4, 30))  # a global basis
    for basis, glob in ((None, 0.0), (b, b.T @ b)):
        u = loc.factor(q[0], basis)
        want = (1 - loc.shrink) * e.T @ e / 7 + loc.shrink * glob
        np.testing.assert_allclose(u.T @ u, want, rtol=1e-12, atol=1e-12)
        # the device's form: each star's rows of the stacked array
        k = 0 if basis is None else 4
        np.testing.assert_array_equal(loc.stacked(basis)[loc.rows(q, k)[0]], u)
    assert LocalError(errors, scaled, 7, shrink=0.0).factor(q[0]).shape == (7, 30)
    with pytest.raises(ValueError, match="shrink must be in"):
        LocalError(errors, scaled, 7, shrink=1.0)
    with pytest.raises(ValueError, match="neighbours must be 2 .. 50"):
        LocalError(errors, scaled, 51)
    with pytest.raises(ValueError, match="one row per held-out spectrum"):
        LocalError(errors, scaled[:-1], 7)
    bad = errors.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="errors"):
        LocalError(bad, scaled, 7)
    with pytest.raises(ValueError, match="expected 3 per row"):
        loc.nearest(np.zeros((1, 2)))
    # from_residuals: an unusable (NaN) pixel counts as no error
    assert LocalError.from_residuals(bad, scaled, 7).errors[3, 4] == 0.0


def test_derivative_taps_are_the_fitters_interpolants_at_a_node():
    """The emulator's rv-derivative taps (no import of the observation model)
    equal the derivatives of the fitter's Doppler interpolant's weights at a node
    (tap_weights, float64)."""
    from payne_lite.emulator._local_error import derivative_taps
    from payne_lite.observe import DOPPLER_INTERP, TAP_OFFSETS, tap_weights

    offs, w = derivative_taps()
    assert offs == TAP_OFFSETS[DOPPLER_INTERP]
    with jax.enable_x64():
        dw = np.array(
            [float(v) for v in tap_weights(DOPPLER_INTERP, jnp.asarray(0.0))[1]]
        )
    np.testing.assert_allclose(w, dw, rtol=0, atol=1e-12)


def test_doppler_shifts_recover_a_shifted_truth():
    """doppler_shifts of errors predict - truth, the truth the model shifted by
    known small rvs (exact shifts of smooth lines on a log grid with a gap):
    those rvs, to 2 %; a gap's neighbours do not count; no derivative: 0."""
    from payne_lite.emulator import doppler_shifts

    x = np.log(np.r_[np.geomspace(15100, 15300, 400), np.geomspace(15400, 15600, 400)])
    lam = np.exp(x)
    centres = np.array([15150.0, 15220.0, 15260.0, 15450.0, 15530.0])

    def spectrum(v):  # Gaussian lines of 0.4 A, observed at rv v [km/s]
        c = centres * (1 + v / C_KMS)
        return 1 - 0.4 * np.exp(-0.5 * ((lam[None] - c[:, None]) / 0.4) ** 2).sum(0)

    rvs = np.array([-0.3, 0.05, 0.2])
    model = np.stack([spectrum(0.0)] * 3)
    truth = np.stack([spectrum(v) for v in rvs])
    got = doppler_shifts(lam, model, model - truth)
    np.testing.assert_allclose(got, rvs, rtol=0.02)
    flat = np.ones((1, lam.size))
    assert doppler_shifts(lam, flat, flat * 0.01)[0] == 0.0


def test_sampler_log_likelihood_with_a_local_error_is_the_dense_gaussian():
    """log_posterior with the emulator's LocalError: -1/2 r^T C^-1 r with C of the
    errors nearest the first point's labels, shrunk toward the global model, placed
    at the window's rv (numpy), plus the neighbours' mean squared Doppler shift
    along the model's rv derivative there, for both points."""
    e, basis, pe = _emulator_with_basis()
    e = _with_local_error(e)
    rng = np.random.default_rng(4)
    mask = np.zeros(N_PIX, bool)
    mask[:25] = mask[-25:] = True
    s, rv = rng.uniform(-0.3, 0.3, 3), -20.0
    flux = reference_spectra(e, s[None], np.array([rv]))[0]
    err = np.full(N_PIX, 0.004)
    flux = flux + err * rng.standard_normal(N_PIX)
    pts = np.array([np.r_[e.unscale(s), rv], np.r_[e.unscale(s - 0.02), rv - 0.4]])
    lp = log_posterior(flux, err, e, pts, rv_centre=rv, mask=mask)
    held = e.local_error
    keep = ~mask
    near, c, s2 = _dense_local_c(e, basis, pe, err, keep, rv, s)
    # the Doppler term: s2 d d^T, d the model's rv derivative at the first point
    obs = build_obs_model(e)
    q = jnp.asarray(np.r_[s, rv], jnp.float32)
    d = np.asarray(observe_jac(obs, q)[2], np.float64)[:, 3][keep]
    assert s2 > 0
    c = c + s2 * np.outer(d, d)
    for i, pt in enumerate(pts):
        p = np.r_[e.scale(pt[:3]), pt[3]]
        model = np.asarray(observe(obs, jnp.asarray(p, jnp.float32))[0], np.float64)
        r = (model - flux)[keep]
        np.testing.assert_allclose(lp[i], -0.5 * r @ np.linalg.solve(c, r), rtol=2e-4)
    # held at the first point's labels: another first point, another C
    lp_far = log_posterior(flux, err, e, pts[::-1], rv_centre=rv, mask=mask)
    far = np.argsort(np.sum((held.scaled - e.scale(pts[1, :3])) ** 2, axis=1))[:6]
    assert set(far) != set(near)
    assert lp_far[1] != pytest.approx(lp[0], rel=1e-6)


def test_cli_local_error_then_a_gls_fit(tmp_path, capsys):
    """payne-lite local-error EMULATOR GRID -o OUT stores Emulator.with_local_error's
    model (format version 4), info shows it, and a GLS fit with it writes a table
    that says so, without the small-basis warning; too many neighbours is refused
    in one line."""

    import h5py

    import payne_lite as pl
    from payne_lite.cli import main

    e, grid = _held_out_files(tmp_path)
    out = tmp_path / "local.h5"
    args = ["local-error", str(tmp_path / "e.h5"), str(tmp_path / "held.h5")]
    assert main([*args, "--neighbours", "20", "--shrink", "0.3", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "local_error: 60 held-out errors, 20 nearest" in text, text
    assert "shrunk 0.3 toward" in text, text
    with h5py.File(out) as f:
        assert f.attrs["format_version"] == 4
    new = pl.Emulator.load(out)
    want = e.with_local_error(grid, neighbours=20, shrink=0.3)
    np.testing.assert_array_equal(new.local_error.errors, want.local_error.errors)
    assert new.local_error.shrink == 0.3
    np.testing.assert_allclose(new.local_error.scaled, e.scale(grid.labels))
    assert main(["info", str(out)]) == 0
    assert "60 held-out errors with their labels" in capsys.readouterr().out
    assert main([*args, "--neighbours", "61", "-o", str(tmp_path / "x.h5")]) != 0
    err = capsys.readouterr().err
    assert "neighbours must be 2 .. 60" in err and err.count("\n") == 1, err
    assert main([*args, "--shrink", "1", "-o", str(tmp_path / "x.h5")]) != 0
    assert "must be in [0, 1), got '1'" in capsys.readouterr().err
    t = _cli_gls_fit(tmp_path, e, out)
    assert "warning" not in capsys.readouterr().err
    assert t.meta["estimator"] == "gls" and t.meta["emulator_error_local"] is True
