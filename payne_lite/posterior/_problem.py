"""What every star of one sampling call shares (host side): input validation, the
observation model, each star's :class:`Target` (weights, prior support), and the
starting-point helpers (truncated normals, reflected balls, the linear continuum)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..emulator import Emulator, LocalError
from ..observe import (
    MDN_NSIGMA,
    Instrument,
    ObsModel,
    basis_on,
    build_error_model,
    build_obs_model,
    check_fixed,
    check_inputs,
    check_rv_range,
    diagonal_variance,
    emulator_error_on,
    observe,
    observe_jac,
    param_layout,
)
from ._likelihood import Target, window_valid_batch

PRIORS = ("box", "mdn-uniform", "mdn-gauss")
#: :func:`ball`'s default: points at the LM solution + BALL_SCALE * (LM
#: covariance)^(1/2) z (emcee's walkers use ``EmceeOptions.init_scale``).
BALL_SCALE = 0.1


def truncnorm_logpdf(x, mu, sd, lo, hi):
    """log density of N(mu, sd) truncated to [lo, hi], elementwise (float64)."""
    from scipy.stats import truncnorm

    a, b = (lo - mu) / sd, (hi - mu) / sd
    return truncnorm.logpdf(x, a, b, loc=mu, scale=sd)


def truncnorm_draw(rng, mu, sd, lo, hi, size):
    """(size, kf) draws of independent N(mu, sd) truncated to [lo, hi] (inverse CDF,
    scipy's ``truncnorm``, accurate in the tails)."""
    from scipy.stats import truncnorm

    a, b = (lo - mu) / sd, (hi - mu) / sd
    return truncnorm.rvs(a, b, loc=mu, scale=sd, size=(size, mu.size), random_state=rng)


def _reflect(x, lo, hi):
    """Reflect ``x`` into [lo, hi] (componentwise; for the starting ball)."""
    span = hi - lo
    y = np.mod(x - lo, 2.0 * span)
    y = np.where(y > span, 2.0 * span - y, y)
    return lo + np.clip(y, 1e-9 * span, (1.0 - 1e-9) * span)


def linear_continuum(obs, p, flux, w, n_cont):
    """Continuum coefficients (n_cont,) solving weighted least squares at ``p``."""
    q = np.asarray(p, np.float64).copy()
    q[obs.n_labels + 1 :] = 0.0
    q[obs.n_labels + 1] = 1.0
    m, _ = observe(obs, jnp.asarray(q, obs.x_obs.dtype))
    m = np.asarray(m, np.float64)
    b = np.asarray(obs.basis, np.float64) * m[:, None]
    a = (b * w[:, None]).T @ b
    rhs = (b * w[:, None]).T @ flux
    try:
        return np.linalg.solve(a + 1e-9 * np.trace(a) * np.eye(n_cont), rhs)
    except np.linalg.LinAlgError:
        out = np.zeros(n_cont)
        out[0] = 1.0
        return out


@dataclasses.dataclass(frozen=True)
class Problem:
    """What every star of one :func:`sample` call shares (host side)."""

    emulator: Emulator
    obs: ObsModel
    layout: object
    flux2: np.ndarray  # (n, P)
    ivar: np.ndarray  # (n, P) 1 / err^2, 0 = unused
    fix: dict
    idx: np.ndarray  # (kf,) free parameters
    prior: str
    rv_range: tuple
    rv_window: float
    perr: np.ndarray | None  # (P_rest,) emulator error, or None
    basis: np.ndarray | None  # (K, P_rest) emulator error basis, or None
    wave_rest: np.ndarray
    wave_obs: np.ndarray
    mdn_mean: np.ndarray | None  # (n, L + 1) physical
    mdn_sigma: np.ndarray | None
    mdn_ok: np.ndarray  # (n,) bool
    # the emulator's LocalError (then the error model at each star's centre), or None
    local: LocalError | None = None

    def mdn_fit_space(self, i):
        """MDN mean and sigma (L + 1,) in fit space (scaled labels, rv) for star i."""
        emu = self.emulator
        n_lab = emu.n_labels
        m = np.array(self.mdn_mean[i], np.float64)
        s = np.array(self.mdn_sigma[i], np.float64)
        m[:n_lab] = emu.scale(m[:n_lab])
        s[:n_lab] = s[:n_lab] / (emu.label_hi - emu.label_lo)
        return m, s

    def target(self, i, centre) -> dict:
        """Star i's :class:`Target` as a dict of NumPy arrays.

        ``centre`` (k,) in fit space: its rv is the RV window's centre, its values
        of fixed parameters are replaced by ``fixed``'s; with the emulator's error
        basis, its rv and continuum (a flat one where all zero) place the basis
        (:func:`payne_lite.observe.basis_on`); with the emulator's
        :class:`~payne_lite.emulator.LocalError` that basis is the error
        covariance's factor at its labels (its neighbours, then the global basis,
        :meth:`~payne_lite.emulator.LocalError.factor`), with one more row for
        its Doppler zero point (the square root of ``shift_variance`` times the
        model's rv derivative there), and the per-pixel rest is scaled by its
        ``shrink``; its other entries unused.
        """
        layout, n_lab = self.layout, self.layout.n_labels
        k = len(layout.names)
        dt = self.obs.x_obs.dtype
        rv_c = float(np.clip(centre[n_lab], *self.rv_range))
        rv_lo = max(rv_c - self.rv_window, self.rv_range[0])
        rv_hi = min(rv_c + self.rv_window, self.rv_range[1])
        if n_lab in self.fix:
            rv_c = rv_lo = rv_hi = self.fix[n_lab]
        valid = np.asarray(
            window_valid_batch(
                self.obs, jnp.asarray([rv_lo], dt), jnp.asarray([rv_hi], dt)
            )
        )[0]
        w = np.where(valid, self.ivar[i], 0.0)
        var_emu = 0.0
        base = np.array(centre, np.float64)
        for j, v in self.fix.items():
            base[j] = v
        basis, skip = self.basis, 0
        if self.perr is not None:
            pe = emulator_error_on(
                self.wave_obs, self.wave_rest, self.perr, np.array([rv_c])
            )[0]
            var_emu = pe**2
        s2 = 0.0
        if self.local is not None:  # C_emu at the centre's labels
            basis = self.local.factor(base[:n_lab], self.basis)
            var_emu, skip = self.local.shrink * var_emu, self.local.neighbours
            s2 = float(self.local.shift_variance(base[:n_lab])[0])
        extra = {}
        if basis is None:  # diagonal: 1 / (err^2 + e^2)
            w = np.where(w > 0, 1.0 / (1.0 / np.where(w > 0, w, 1.0) + var_emu), 0.0)
        else:  # the error model with the basis at the centre's rv and continuum
            q = base.copy()
            q[n_lab] = rv_c
            cs = layout.cont_slice
            if self.obs.n_cont and not np.any(q[cs]):  # no continuum given: 1
                q[cs] = self.obs.cont.flat()
            u = np.asarray(
                _basis_on(self.obs, jnp.asarray(basis, dt), jnp.asarray(q, dt)),
                np.float64,
            )
            if s2 > 0:  # the Doppler zero point: s d, d the rv derivative at q
                d = np.asarray(
                    _observe_jac(self.obs, jnp.asarray(q, dt))[2], np.float64
                )
                u = np.vstack([np.sqrt(s2) * d[:, n_lab][None], u])
                skip += 1
            var = np.where(w > 0, 1.0 / np.where(w > 0, w, 1.0), 0.0)
            em = build_error_model(diagonal_variance(var, var_emu, u[skip:]), u)
            w, extra = em.d_inv, {"v": em.v}
        lo = layout.lower.copy()
        hi = layout.upper.copy()
        lo[n_lab], hi[n_lab] = rv_lo, rv_hi
        mu = np.zeros(k)
        ivp = np.zeros(k)
        if self.prior != "box" and self.mdn_ok[i]:
            m, s = self.mdn_fit_space(i)
            if self.prior == "mdn-uniform":
                lo[: n_lab + 1] = np.maximum(lo[: n_lab + 1], m - MDN_NSIGMA * s)
                hi[: n_lab + 1] = np.minimum(hi[: n_lab + 1], m + MDN_NSIGMA * s)
            else:
                mu[: n_lab + 1] = m
                ivp[: n_lab + 1] = 1.0 / s**2
        idx = self.idx
        return dict(
            base=base, idx=idx, flux=self.flux2[i], w=w, lo=lo[idx], hi=hi[idx],
            mu=mu[idx], ivp=ivp[idx], **extra,
        )  # fmt: skip


_basis_on = jax.jit(basis_on)
_observe_jac = jax.jit(observe_jac)


def to_device(tg: dict, dt) -> Target:
    """A :meth:`Problem.target` dict as a :class:`Target` of JAX arrays (``idx`` int32,
    the rest in the model's float ``dt``)."""
    return Target(
        **{
            key: jnp.asarray(val, jnp.int32 if key == "idx" else dt)
            for key, val in tg.items()
        }
    )


def check_instrument(instrument) -> Instrument:
    if instrument is None:
        return Instrument()
    if not isinstance(instrument, Instrument):
        raise ValueError(
            f"instrument must be a payne_lite.Instrument, got {type(instrument).__name__}"
        )
    return instrument


def sampler_instrument(inst: Instrument, fixed, emulator, wavelength):
    """(broadening names, vacuum wavelength) of the samplers' one grid."""
    if wavelength is not None and np.ndim(wavelength) != 1:
        raise ValueError(
            f"the samplers take one wavelength grid (P,), got {np.shape(wavelength)}; "
            "sample spectra on different grids in separate calls"
        )
    if inst.per_star:
        raise ValueError(
            "the samplers take one wavelength grid: a per-star (n, P) resolution or "
            "lsf_sigma is refused; sample such spectra in separate calls"
        )
    return inst.broadening(fixed, emulator), inst.vacuum_wavelength(wavelength)


def prepare(
    flux, flux_err, emulator, *, mask, wavelength, prior, mdn, cont_deg, rv_range,
    rv_window, fixed, emulator_error, model_options=None,
) -> Problem:  # fmt: skip
    """Validate the inputs shared by :func:`sample` and :func:`log_posterior`.

    ``model_options``: ``resolution``, ``lsf_sigma``, ``emulator_resolution``,
    ``broadening`` (names) and ``limb_darkening``, for :func:`build_obs_model`."""
    opts = dict(model_options or {})
    broadening = tuple(opts.get("broadening", ()))
    if prior not in PRIORS:
        raise ValueError(f"prior must be one of {PRIORS}, got {prior!r}")
    if mdn is None and prior != "box":
        raise ValueError(f"prior={prior!r} needs an mdn")
    if not (np.isfinite(rv_window) and rv_window > 0):
        raise ValueError(f"rv_window must be > 0 [km/s], got {rv_window!r}")
    rv_range = check_rv_range(rv_range)
    if mdn is not None:
        mdn.check_emulator(emulator)
        if wavelength is not None:
            mdn.check_wavelength(wavelength)
    obs = build_obs_model(
        emulator,
        wavelength=wavelength,
        cont_deg=cont_deg,
        rv_max=max(abs(v) for v in rv_range),
        **opts,
    )
    layout = param_layout(
        emulator, cont_deg=cont_deg, rv_range=rv_range, broadening=broadening
    )
    flux2, ivar = check_inputs(flux, flux_err, mask, obs.x_obs.shape[0])
    n = flux2.shape[0]
    fix = check_fixed(fixed, emulator, rv_range, layout)
    free = np.ones(len(layout.names), bool)
    free[list(fix)] = False
    mdn_mean = mdn_sigma = None
    mdn_ok = np.zeros(n, bool)
    if mdn is not None:
        mdn_mean, mdn_sigma = mdn.predict(flux2, err_from_ivar(ivar), mask=~(ivar > 0))
        mdn_mean = np.atleast_2d(np.asarray(mdn_mean, np.float64))
        mdn_sigma = np.atleast_2d(np.asarray(mdn_sigma, np.float64))
        if mdn_mean.shape != (n, emulator.n_labels + 1) or mdn_sigma.shape != (
            n,
            emulator.n_labels + 1,
        ):
            raise ValueError(
                f"mdn.predict returned mean {mdn_mean.shape} and sigma "
                f"{mdn_sigma.shape}, expected ({n}, {emulator.n_labels + 1})"
            )
        with np.errstate(invalid="ignore"):
            mdn_ok = np.all(np.isfinite(mdn_mean) & (mdn_sigma > 0), axis=1)
            mdn_ok &= np.all(np.isfinite(mdn_sigma), axis=1)
    return Problem(
        emulator=emulator,
        obs=obs,
        layout=layout,
        flux2=flux2,
        ivar=ivar,
        fix=fix,
        idx=np.flatnonzero(free),
        prior=prior,
        rv_range=rv_range,
        rv_window=float(rv_window),
        perr=(
            np.asarray(emulator.pixel_error, np.float64)
            if emulator_error and emulator.pixel_error is not None
            else None
        ),
        basis=(
            np.asarray(emulator.error_basis, np.float64)
            if emulator_error and emulator.error_basis is not None
            else None
        ),
        wave_rest=np.asarray(emulator.wavelength, np.float64),
        wave_obs=np.asarray(
            emulator.wavelength if wavelength is None else wavelength, np.float64
        ),
        mdn_mean=mdn_mean,
        mdn_sigma=mdn_sigma,
        mdn_ok=mdn_ok,
        local=emulator.local_error if emulator_error else None,
    )


def err_from_ivar(ivar):
    """1-sigma errors from inverse variances (same shape); inf where ``ivar <= 0``."""
    with np.errstate(divide="ignore"):
        return np.where(ivar > 0, 1.0 / np.sqrt(np.where(ivar > 0, ivar, 1.0)), np.inf)


def ball(rng, centre, cov, tg, n_walkers, scale=BALL_SCALE):
    """Walkers (n_walkers, kf) at ``centre + scale chol(cov) z``, reflected into
    the prior's support; a tiny isotropic ball where the covariance is unusable."""
    kf = centre.size
    lo, hi = tg["lo"], tg["hi"]
    try:
        if not np.all(np.isfinite(cov)):
            raise np.linalg.LinAlgError("non-finite covariance")
        chol = np.linalg.cholesky(
            cov + 1e-12 * np.diag(np.diag(cov)) + 1e-15 * np.eye(kf)
        )
    except np.linalg.LinAlgError:
        chol = np.diag(1e-3 * np.minimum(hi - lo, 1.0))
    z = rng.standard_normal((n_walkers, kf))
    x = centre[None, :] + scale * z @ chol.T
    return _reflect(x, lo[None, :], hi[None, :])
