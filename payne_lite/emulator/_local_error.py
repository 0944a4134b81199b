"""The emulator's error covariance where it is asked: :class:`LocalError`.

An emulator's error is one smooth function of the labels, ``e(x) = predict(x) -
truth(x)``, and its *pattern* changes over the box: the lines it gets wrong in a
cool giant are not a hot dwarf's. ``Emulator.error_basis`` holds one covariance of
held-out errors for the whole box. That is what the default fit's sandwich needs
(with its label-space ``error_scale``), but generalised least squares and the
samplers, whose ``C^-1`` trusts every direction ``C`` calls quiet, came out too
narrow with it on the shipped default emulator at S/N 300 (sd of z 1.4-1.8 with
256-1,024 components; ``benchmarks/bench_gls_default.py``).

:class:`LocalError` keeps the held-out errors themselves, with their labels. At
labels ``x`` the emulator's error covariance is the mean outer product of the
errors of the ``neighbours`` held-out spectra nearest ``x`` (Euclidean in the
scaled labels)::

    C_emu(x) = (1 / m) sum_{j in N_m(x)} e_j e_j^T,

a rank-``m`` factor ``U(x) = E[N_m(x)] / sqrt(m)`` for the Woodbury identity. An
average of ``m`` errors is a noisy estimate of a covariance, and ``C^-1`` of a noisy
estimate is too large on average (GLS comes out too narrow; with 50 neighbours sd of
z 1.17-1.33), so it is shrunk toward the emulator's global error model ``C_g``
(``error_basis`` ``B`` and the per-pixel rest of ``pixel_error``)::

    C_emu(x) = (1 - a) C_m(x) + a C_g,    C_g = B^T B + diag(pixel_error^2 - diag B^T B),

``a`` = :attr:`LocalError.shrink`: the factor stacks ``sqrt(1 - a) U(x)`` on
``sqrt(a) B`` and the diagonal keeps ``a`` times the per-pixel rest.
Measured on the shipped default emulator (linearised GLS on 228 fresh synthesizer
spectra at S/N 300, 2,000 held out; ``benchmarks/bench_local_error.py``): sd of the
label z-scores 1.20-1.43 with the whole set's covariance at full rank, 1.03-1.11
with the 100 nearest errors', 0.97-1.04 with those shrunk by 0.15 toward the
emulator's 32-component global model, 0.94-0.99 with each spectrum's own error (the
oracle). Where the neighbours come from matters more than how many components:
the 100 nearest projected on 256 global components gave 1.18-1.34. In the fits
themselves (GLS, rv free, 100 nearest of 4,000, shrink 0.15;
``benchmarks/bench_gls_default.py``) the truths fell within 1 sigma 0.63-0.76 of
the time for every label and rv at S/N 30, 100 and 300.

**A star's own Doppler zero point.** Part of an emulator's error at ``x`` is a
shift of its lines, which moves the fitted rv; the neighbours' errors shift their
own lines, not along this star's rv derivative, and GLS trusted that direction
(measured on a student of The Payne's APOGEE network at S/N 300: the worst star's
own error moved its GLS rv by -13.7 sigma while its labels stayed within 0.6).
So each held-out error's shift ``dv_j`` (its projection on its own spectrum's rv
derivative, :func:`doppler_shifts`) is kept apart (:attr:`LocalError.shifts`)
and taken out of the stored error (:meth:`payne_lite.Emulator.with_local_error`),
and ``C`` gains ``s(x)^2 d d^T``, ``s(x)^2`` the neighbours' mean ``dv^2``
(:meth:`LocalError.shift_variance`) and ``d`` the star's own rv derivative.
Variance along a column of the Jacobian leaves the GLS estimate as it is and adds
exactly ``s^2`` to the rv variance, ``(J^T C'^-1 J)^-1 = (J^T C^-1 J)^-1 + s^2
e_rv e_rv^T``; the samplers carry it as one more row of their factor. Kept in the
stored errors as well, the shifts counted twice (rv within 1 sigma 0.87-0.89 at
S/N 300 on the student); apart, 0.62-0.70, where without the term it was 0.50-0.61.

Pure NumPy (host): the neighbours are found once per star, at its point fit, and
``C`` is held there (as the samplers hold it at their start).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .. import _h5
from .._validate import as_float_array, check_finite
from ..constants import C_KMS
from ..errors import FileFormatError

__all__ = [
    "LOCAL_NEIGHBOURS",
    "LOCAL_SHRINK",
    "LocalError",
    "derivative_taps",
    "doppler_shifts",
    "rv_derivative",
    "shifts_along",
]

#: Neighbours per star by default: of 2,000 held-out spectra, 100 and 200 gave the
#: same coverage in fits (100 at half the cost), 400 a little less, 50 too narrow
#: (benchmarks/README.md, "A label-dependent error covariance").
LOCAL_NEIGHBOURS = 100
#: Weight of the emulator's global error model in the local covariance by default
#: (``LocalError.shrink``): 0.05-0.3 gave sd of z 0.95-1.06 in the linearised
#: measure above, none 1.03-1.11.
LOCAL_SHRINK = 0.15


@dataclasses.dataclass(frozen=True, eq=False)
class LocalError:
    """Held-out emulator errors and their labels: the error covariance near any
    labels (see the module docstring).

    Attributes:
        errors: (N, P) float32 ``predict(labels) - flux`` of N held-out spectra on
            the emulator's wavelength grid (0 where a pixel has no valid flux).
        scaled: (N, L) their scaled labels (the emulator's box is [-0.5, 0.5]).
        neighbours: m, the held-out spectra averaged at any labels (2 .. N).
        shrink: a in [0, 1), the global error model's weight (module docstring).
        shifts: optional (N,) [km/s]: each error's Doppler shift
            (:func:`doppler_shifts`); None: no rv term.
    """

    errors: np.ndarray
    scaled: np.ndarray
    neighbours: int = LOCAL_NEIGHBOURS
    shrink: float = LOCAL_SHRINK
    shifts: np.ndarray | None = None

    def __post_init__(self):
        e = as_float_array(self.errors, "errors", ndim=2, dtype=np.float32)
        s = as_float_array(self.scaled, "scaled", ndim=2)
        check_finite(e, "errors")
        check_finite(s, "scaled")
        if s.shape[0] != e.shape[0]:
            raise ValueError(
                f"scaled labels {s.shape} and errors {e.shape}: one row per "
                "held-out spectrum in each"
            )
        m = int(self.neighbours)
        if not 2 <= m <= e.shape[0]:
            raise ValueError(
                f"neighbours must be 2 .. {e.shape[0]} (the held-out spectra), got "
                f"{self.neighbours}"
            )
        shrink = float(self.shrink)
        if not 0.0 <= shrink < 1.0:
            raise ValueError(f"shrink must be in [0, 1), got {self.shrink}")
        object.__setattr__(self, "shrink", shrink)
        if self.shifts is not None:
            dv = as_float_array(self.shifts, "shifts", ndim=1)
            check_finite(dv, "shifts")
            if dv.shape != (e.shape[0],):
                raise ValueError(
                    f"shifts {dv.shape}: one per held-out error ({e.shape[0]})"
                )
            dv.setflags(write=False)
            object.__setattr__(self, "shifts", dv)
        for a in (e, s):
            a.setflags(write=False)
        object.__setattr__(self, "errors", e)
        object.__setattr__(self, "scaled", s)
        object.__setattr__(self, "neighbours", m)

    @property
    def n_held_out(self) -> int:
        return int(self.errors.shape[0])

    def nearest(self, scaled) -> np.ndarray:
        """(n, m) int: the rows of :attr:`errors` nearest each of ``scaled``
        (n, L) (clipped to the box first), nearest first."""
        s = np.clip(np.atleast_2d(np.asarray(scaled, np.float64)), -0.5, 0.5)
        if s.shape[1] != self.scaled.shape[1]:
            raise ValueError(
                f"scaled labels {s.shape}: expected {self.scaled.shape[1]} per row"
            )
        d2 = (
            np.sum(s * s, 1)[:, None]
            - 2.0 * s @ self.scaled.T
            + np.sum(self.scaled**2, 1)[None, :]
        )
        m = self.neighbours
        idx = np.argpartition(d2, m - 1, axis=1)[:, :m]
        order = np.argsort(np.take_along_axis(d2, idx, 1), axis=1)
        return np.take_along_axis(idx, order, 1)

    def shift_variance(self, scaled) -> np.ndarray:
        """(n,) [km^2/s^2] ``s(x)^2``, the mean squared :attr:`shifts` of the
        neighbours of each of ``scaled`` (n, L); zeros without shifts."""
        near = self.nearest(scaled)
        if self.shifts is None:
            return np.zeros(near.shape[0])
        return np.mean(self.shifts[near] ** 2, axis=1)

    def stacked(self, error_basis=None) -> np.ndarray:
        """(N + K, P) float64: the errors times ``sqrt(1 - shrink) / sqrt(m)`` on
        the global ``error_basis`` (K, P) times ``sqrt(shrink)`` (K = 0 for None):
        a star's factor is its :meth:`rows` of it."""
        e = np.asarray(self.errors, np.float64) * np.sqrt(
            (1.0 - self.shrink) / self.neighbours
        )
        if error_basis is None:
            return e
        return np.vstack(
            [e, np.sqrt(self.shrink) * np.asarray(error_basis, np.float64)]
        )

    def rows(self, scaled, n_global: int = 0) -> np.ndarray:
        """(n, m + n_global) int: each star's rows of :meth:`stacked`, its nearest
        errors then the ``n_global`` rows of the global basis."""
        near = self.nearest(scaled)
        glob = np.arange(self.n_held_out, self.n_held_out + int(n_global))
        return np.hstack([near, np.broadcast_to(glob, (near.shape[0], glob.size))])

    def factor(self, scaled, error_basis=None) -> np.ndarray:
        """(m + K, P) float64 ``U``: ``U^T U`` is ``C_emu`` at one label vector
        ``scaled`` (L,) less the diagonal rest (``shrink`` times ``pixel_error^2``
        less the diagonal of the global basis's part, the caller's)."""
        near = self.nearest(scaled)[0]
        u = np.asarray(self.errors[near], np.float64)
        u *= np.sqrt((1.0 - self.shrink) / self.neighbours)
        if error_basis is None:
            return u
        return np.vstack(
            [u, np.sqrt(self.shrink) * np.asarray(error_basis, np.float64)]
        )

    @classmethod
    def from_residuals(
        cls, resid, scaled, neighbours=LOCAL_NEIGHBOURS, shrink=LOCAL_SHRINK
    ) -> LocalError:
        """From held-out residuals (N, P) (non-finite = unused pixel, stored as 0)."""
        return cls(
            np.nan_to_num(np.asarray(resid, np.float64)), scaled, neighbours, shrink
        )

    # -- files ------------------------------------------------------------------------
    def write(self, group) -> None:
        """Write into an HDF5 group (see :mod:`payne_lite.emulator._file`)."""
        group.attrs["neighbours"] = self.neighbours
        group.attrs["shrink"] = self.shrink
        _h5.write_dataset(group, "errors", self.errors)
        _h5.write_dataset(group, "scaled", self.scaled)
        if self.shifts is not None:
            _h5.write_dataset(group, "shifts", self.shifts)

    @classmethod
    def read(cls, group, path) -> LocalError:
        """Read what :meth:`write` wrote; FileFormatError naming ``path`` if broken."""
        try:
            return cls(
                errors=_h5.read_dataset(group, "errors", path),
                scaled=_h5.read_dataset(group, "scaled", path),
                neighbours=int(group.attrs["neighbours"]),
                shrink=float(group.attrs["shrink"]),
                shifts=(
                    _h5.read_dataset(group, "shifts", path)
                    if "shifts" in group
                    else None
                ),
            )
        except (ValueError, TypeError, KeyError) as err:
            raise FileFormatError(
                f"{os.fspath(path)}: inconsistent local error model: {err}"
            ) from err


#: The Lanczos window of the fitter's Doppler interpolant
#: (:data:`payne_lite.observe.DOPPLER_INTERP`, ``"lanczos6"``; a test holds the two
#: together: this module may not import the observation model).
DERIVATIVE_LANCZOS = 6


def derivative_taps(a: int = DERIVATIVE_LANCZOS):
    """``(offsets, weights)``: the Lanczos-``a`` interpolant's derivative by the
    position at a node, ``sum_k w_k f[i + o_k]`` (offsets ``-a + 1 .. a``). At a
    node the normalised kernel's weights are one-hot and their derivatives sum to
    0, so ``w_k = K'(-o_k) = -(-1)^o / o sinc(o / a)`` (0 at ``o = 0`` and ``a``)."""
    o = np.arange(-a + 1, a + 1)
    w = np.zeros(o.size)
    nz = (o != 0) & (np.abs(o) < a)
    w[nz] = -((-1.0) ** o[nz]) / o[nz] * np.sinc(o[nz] / a)
    return tuple(int(v) for v in o), w


def rv_derivative(wavelength, model) -> np.ndarray:
    """(N, P) [flux per km/s]: ``d = -(1/c) dF/d ln(lambda)``, the rest-frame rv
    derivative of the spectra ``model`` (N, P) on ``wavelength`` (P,) [A] as the
    fitter's Doppler interpolant has it at the pixels (its taps' derivatives at a
    node); 0 where a tap crosses a gap of more than 1.5 median steps or leaves the
    grid."""
    x = np.log(np.asarray(wavelength, np.float64))
    f = np.atleast_2d(np.asarray(model, np.float64))
    offs, dw = derivative_taps()
    step = np.diff(x)
    seg = np.concatenate([[0], np.cumsum(step > 1.5 * np.median(step))])  # chip ids
    n = x.size
    idx = np.arange(n)
    d = np.zeros_like(f)
    ok = np.ones(n, bool)
    for o, wk in zip(offs, dw, strict=True):
        j = idx + o
        jc = np.clip(j, 0, n - 1)
        ok &= (j >= 0) & (j < n) & (seg[jc] == seg)
        d += wk * f[:, jc]
    h = np.r_[step, step[-1:]]  # the pixel's own step in ln(lambda)
    return np.where(ok, -d / (h * C_KMS), 0.0)


def doppler_shifts(wavelength, model, errors) -> np.ndarray:
    """(N,) [km/s]: the Doppler shift of each error ``errors`` (N, P) (``predict -
    truth``) along its own spectrum ``model`` (N, P) on ``wavelength`` (P,) [A]:
    ``dv = -(d . e) / (d . d)``, ``d`` its :func:`rv_derivative`, so that the
    truth is about the model shifted by ``dv`` (0 for a featureless spectrum)."""
    return shifts_along(rv_derivative(wavelength, model), errors)


def shifts_along(d, errors) -> np.ndarray:
    """(N,) [km/s]: :func:`doppler_shifts` from the spectra's rv derivatives ``d``
    (N, P) (:func:`rv_derivative`), for a caller that needs ``d`` too."""
    d = np.asarray(d, np.float64)
    e = np.asarray(errors, np.float64)
    dd = np.sum(d * d, axis=1)
    some = dd > 1e-20  # a featureless spectrum's rounding (a line's is ~1e-3 P)
    return np.where(some, -np.sum(d * e, axis=1) / np.where(some, dd, 1.0), 0.0)
