"""How an emulator's error shows in the labels, over its box: ``Emulator.error_scale``.

The fit's label errors include the emulator's error through the sandwich with its
``error_basis`` ``B`` (one covariance ``B^T B`` of the held-out errors, the same
everywhere in the box): the emulator term of the label covariance is
``A^-1 (B W J)^T (B W J) A^-1`` with ``A = J^T W J``. What the emulator's error at
labels ``x`` actually does to a fit is the first-order shift

    delta(x) = -A^-1 J^T W e(x),        e = emulator - truth (the held-out error),

and the two disagree in a way that depends on ``x``: measured on the shipped default
emulator against 1,500 fresh spectra of its synthesizer (``benchmarks/README.md``,
"Label-space scale of the emulator's error"), the shift over the sandwich's emulator
sd had an RMS of 1.9-2.5 for the labels over the box, about 1 for stars with small
emulator errors and 1.5-1.9 (robust) for the half with the larger ones. Scaling the
error's size in pixel space by a quadratic in the labels (an amplitude fitted to each
held-out spectrum's mean squared error) made it worse: the size of the error is
dominated by pixels that do not move the labels.

So the scale is fitted where it acts, in the labels: for every held-out spectrum
``z = delta / sd_emu`` per label and rv, and ``log kappa^2`` per label and rv a
quadratic in the scaled labels fitted to ``log z^2`` (ridge, ``+1.27`` for the mean
of ``log chi2_1``): ``kappa(x)^2`` is then ``E[z^2 | x]`` where ``z`` given ``x`` is
Gaussian (a geometric-mean estimate: heavier tails make it smaller; on the
default emulator the RMS of ``z / kappa`` over the held-out spectra is
0.96-1.04). The fitter
multiplies the emulator term of each label's (and rv's) error by ``kappa`` at the
fitted labels (:func:`payne_lite.fitting.results_table`).

The weights are the fit's, ``1 / (sigma^2 + pixel_error^2)``, at one S/N
(``snr``): ``z`` changes little with it (its RMS per label within 5 % between S/N
50 and 150 on the default emulator), since both ``delta`` and ``sd_emu`` scale
with the same weights.

The calibration's fit is the plain one: every label and rv free, no continuum,
no broadening parameters, the emulator's own grid, rest frame (recorded in
``meta["error_scale"]["setting"]``). The fitter applies the scale to every fit;
with fixed labels, a continuum or broadening parameters ``A^-1`` differs and the
scale is an approximation there (not measured).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from ..emulator import Emulator, error_scale_features
from ._model import build_obs_model, observe_jac_t
from ._noise import basis_on

__all__ = ["calibrate_emulator_errors", "emulator_error_z"]

#: S/N of the weights of :func:`calibrate_emulator_errors` (flux errors 1 / S/N).
CALIBRATION_SNR = 100.0
#: E[log chi2_1] = digamma(1/2) + log 2: the offset of ``log z^2`` for unit variance.
E_LOG_CHI2_1 = -1.2703628454614782
#: Ridge of the quadratic fit, per spectrum (features of order 0.01-1).
CALIBRATION_RIDGE = 1e-3
#: Spectra per compiled call.
CALIBRATION_CHUNK = 128


@jax.jit
def _pieces(obs, p, e, w, basis):
    """Per spectrum: ``J^T W J`` (n, k, k), ``J^T W e`` (n, k), ``B W J`` (n, K, k)
    at parameters ``p`` (n, k), errors ``e`` (n, P), weights ``w`` (n, P)."""

    def one(args):
        q, ei, wi = args
        _, valid, jt = observe_jac_t(obs, q)
        jw = jt * jnp.where(valid, wi, 0.0)
        return jw @ jt.T, jw @ ei, basis_on(obs, basis, q) @ jw.T

    return jax.lax.map(one, (p, e, w))


def emulator_error_z(emulator: Emulator, labels, flux, *, snr=CALIBRATION_SNR):
    """``z`` (N, L + 1): the first-order shift of each label and rv that the
    emulator's own error causes in a fit of the true spectrum ``flux`` (N, P) at
    ``labels`` (N, L) [physical], rest frame, over the emulator term of the fit's
    sandwich error there (``error_basis``), with the weights of flux errors
    ``1 / snr``. Rows whose normal equations are singular are NaN."""
    if emulator.error_basis is None:
        raise ValueError("the emulator has no error_basis: nothing to calibrate")
    labels = np.atleast_2d(np.asarray(labels, np.float64))
    flux = np.atleast_2d(np.asarray(flux, np.float64))
    n = labels.shape[0]
    if labels.shape != (n, emulator.n_labels) or flux.shape != (n, emulator.n_pix):
        raise ValueError(
            f"labels {labels.shape} and flux {flux.shape} must be (N, "
            f"{emulator.n_labels}) and (N, {emulator.n_pix})"
        )
    if not (np.all(np.isfinite(labels)) and np.all(np.isfinite(flux))):
        raise ValueError("labels and flux must be finite")
    obs = build_obs_model(emulator)
    dt = obs.x_obs.dtype
    scaled = emulator.scale(labels)
    p = np.column_stack([scaled, np.zeros(n)])  # rv 0: the rest frame
    e = np.asarray(emulator.predict(labels, allow_outside=True), np.float64) - flux
    var_e = 0.0
    if emulator.pixel_error is not None:
        var_e = np.asarray(emulator.pixel_error, np.float64) ** 2
    w = np.broadcast_to(1.0 / (1.0 / snr**2 + var_e), (emulator.n_pix,))
    basis = jnp.asarray(emulator.error_basis, dt)
    size = min(CALIBRATION_CHUNK, n)
    z = np.full((n, emulator.n_labels + 1), np.nan)
    for a in range(0, n, size):
        rows = np.arange(a, min(a + size, n))
        pad = np.concatenate([rows, np.repeat(rows[-1:], size - rows.size)])
        aa, g, bwj = (
            np.asarray(x, np.float64)
            for x in _pieces(
                obs,
                jnp.asarray(p[pad], dt),
                jnp.asarray(e[pad], dt),
                jnp.asarray(np.broadcast_to(w, (size, w.size)), dt),
                basis,
            )
        )
        for j, i in enumerate(rows):
            try:
                ainv = np.linalg.inv(aa[j])
            except np.linalg.LinAlgError:
                continue
            sd = np.sqrt(np.diag(ainv @ (bwj[j].T @ bwj[j]) @ ainv))
            z[i] = -(ainv @ g[j]) / sd
    return z


def calibrate_emulator_errors(
    emulator: Emulator, grid, *, snr: float = CALIBRATION_SNR
) -> Emulator:
    """The emulator with its :attr:`~payne_lite.Emulator.error_scale` fitted on
    held-out spectra: how much the fit's emulator term of each label's and rv's
    error must grow (or shrink) at each place in the box.

    Args:
        emulator: an emulator with an ``error_basis`` (trained here).
        grid: a :class:`~payne_lite.SpectralGrid` of spectra the emulator was not
            trained on, on its wavelength grid, with labels inside its box: at least
            ``4 F`` of them (``F`` quadratic features: 84 for 5 labels); a thousand
            or more for a stable fit. The built-in synthesizer makes them cheaply
            for the default emulator (``data/make_default_emulator.py``).
        snr: S/N of the weights (see :mod:`payne_lite.observe._calibrate`).

    Returns:
        A copy of ``emulator`` with ``error_scale`` set (``meta["error_scale"]``
        records the grid's size, ``snr`` and the RMS of ``z`` per label before and
        after the scale).

    Raises:
        ValueError: no ``error_basis``, a grid on another wavelength grid or with
            other labels, too few spectra, labels outside the box.
    """
    if emulator.error_basis is None:
        raise ValueError("the emulator has no error_basis: nothing to calibrate")
    if tuple(grid.label_names) != tuple(emulator.label_names):
        raise ValueError(
            f"grid labels {list(grid.label_names)} differ from the emulator's "
            f"{list(emulator.label_names)}"
        )
    wave = np.asarray(grid.wavelength, np.float64)
    if wave.shape != emulator.wavelength.shape or not np.allclose(
        wave, emulator.wavelength, rtol=1e-10, atol=0.0
    ):
        raise ValueError("the grid's wavelengths are not the emulator's")
    labels = np.asarray(grid.labels, np.float64)
    scaled = emulator.scale(labels)
    if np.any(np.abs(scaled) > 0.5 + 1e-9):
        raise ValueError("grid labels outside the emulator's training box")
    feats = error_scale_features(scaled)
    if labels.shape[0] < 4 * feats.shape[1]:
        raise ValueError(
            f"{labels.shape[0]} spectra are too few to fit the scale's "
            f"{feats.shape[1]} coefficients per label (at least {4 * feats.shape[1]})"
        )
    z = emulator_error_z(emulator, labels, grid.flux, snr=snr)
    ok = np.all(np.isfinite(z), axis=1)
    if ok.sum() < 4 * feats.shape[1]:
        raise ValueError(
            f"only {int(ok.sum())} of {ok.size} spectra give finite label shifts "
            f"(singular normal equations): too few for {feats.shape[1]} coefficients"
        )
    f = feats[ok]
    y = np.log(z[ok] ** 2 + 1e-12) - E_LOG_CHI2_1
    gram = f.T @ f + CALIBRATION_RIDGE * len(f) * np.eye(f.shape[1])
    coef = np.linalg.solve(gram, f.T @ y).T  # (L + 1, F)
    out = dataclasses.replace(emulator, error_scale=coef)
    kappa = out.error_scale_at(scaled[ok])
    names = [*emulator.label_names, "rv"]
    meta = dict(emulator.meta)
    meta["error_scale"] = dict(
        n_spectra=int(ok.sum()),
        snr=float(snr),
        setting="every label and rv free; no continuum, no broadening; rest frame",
        rms_z=dict(
            zip(names, np.sqrt(np.mean(z[ok] ** 2, 0)).round(3).tolist(), strict=True)
        ),
        rms_z_scaled=dict(
            zip(
                names,
                np.sqrt(np.mean((z[ok] / kappa) ** 2, 0)).round(3).tolist(),
                strict=True,
            )
        ),
    )
    return dataclasses.replace(out, meta=meta)
