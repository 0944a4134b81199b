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

Pure NumPy (host): the neighbours are found once per star, at its point fit, and
``C`` is held there (as the samplers hold it at their start).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from .. import _h5
from .._validate import as_float_array, check_finite
from ..errors import FileFormatError

__all__ = ["LOCAL_NEIGHBOURS", "LOCAL_SHRINK", "LocalError"]

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
    """

    errors: np.ndarray
    scaled: np.ndarray
    neighbours: int = LOCAL_NEIGHBOURS
    shrink: float = LOCAL_SHRINK

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
        """Write into an HDF5 group (see :mod:`payne_lite.emulator._emulator`)."""
        group.attrs["neighbours"] = self.neighbours
        group.attrs["shrink"] = self.shrink
        _h5.write_dataset(group, "errors", self.errors)
        _h5.write_dataset(group, "scaled", self.scaled)

    @classmethod
    def read(cls, group, path) -> LocalError:
        """Read what :meth:`write` wrote; FileFormatError naming ``path`` if broken."""
        try:
            return cls(
                errors=_h5.read_dataset(group, "errors", path),
                scaled=_h5.read_dataset(group, "scaled", path),
                neighbours=int(group.attrs["neighbours"]),
                shrink=float(group.attrs["shrink"]),
            )
        except (ValueError, TypeError, KeyError) as err:
            raise FileFormatError(
                f"{os.fspath(path)}: inconsistent local error model: {err}"
            ) from err
